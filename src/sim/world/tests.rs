use super::*;

fn day() -> Result<NaiveDate, SimError> {
    NaiveDate::from_ymd_opt(2026, 1, 5).ok_or_else(|| SimError::InvalidConfig("date".into()))
}

#[test]
fn same_seed_same_world() -> Result<(), SimError> {
    let config = SimConfig::for_tests();
    let mut a = World::new_on(&config, day()?)?;
    let mut b = World::new_on(&config, day()?)?;
    assert_eq!(a.contracts(), b.contracts());
    assert_eq!(a.positions(None), b.positions(None));
    for _ in 0..50 {
        assert_eq!(a.random_fill(), b.random_fill());
        a.step_prices();
        b.step_prices();
    }
    assert_eq!(a.positions(None), b.positions(None));
    let other = World::new_on(&SimConfig { seed: 7, ..config }, day()?)?;
    assert_ne!(other.positions(None), a.positions(None));
    Ok(())
}

#[test]
fn fills_keep_ib_average_cost() {
    let mut h = Holding::default();
    apply_fill(&mut h, 2.0, 150.0);
    apply_fill(&mut h, 2.0, 250.0);
    assert_eq!((h.quantity, h.avg_cost), (4.0, 200.0));
    apply_fill(&mut h, -1.0, 300.0);
    assert_eq!((h.quantity, h.avg_cost, h.realized), (3.0, 200.0, 100.0));
    apply_fill(&mut h, -5.0, 100.0);
    assert_eq!((h.quantity, h.avg_cost, h.realized), (-2.0, 100.0, -200.0));
    apply_fill(&mut h, 2.0, 90.0);
    assert_eq!((h.quantity, h.avg_cost, h.realized), (0.0, 0.0, -180.0));
}

#[test]
fn initial_positions_include_options_with_multiplier() -> Result<(), SimError> {
    let world = World::new_on(&SimConfig::for_tests(), day()?)?;
    let positions = world.positions(None);
    assert_eq!(positions.len(), 40);
    let option = positions
        .iter()
        .find(|p| p.contract.is_option())
        .ok_or_else(|| SimError::InvalidConfig("no option position".into()))?;
    assert_eq!(option.contract.multiplier, 100.0);
    // avgCost includes the multiplier: within 15% of price × 100.
    let ratio = option.avg_cost / (option.market_price * 100.0);
    assert!((0.84..1.16).contains(&ratio), "ratio {ratio}");
    Ok(())
}
