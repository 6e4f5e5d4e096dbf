//! The event schemas evolve under one rule: backward and forward compatible with every
//! earlier release (fields added with defaults, none removed or retyped), so a topic holding
//! events of several releases is read whole by any of them. Checked with Avro's own schema
//! resolution (`apache_avro::schema_compatibility`) against the schemas each release shipped
//! (`tests/fixtures/releases/<commit>/schemas/`), and the check itself is shown to catch a
//! change that breaks the rule.

use std::path::{Path, PathBuf};

use anyhow::Context;
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;

const SCHEMAS: [&str; 2] = ["position_event.avsc", "registry_event.avsc"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn parse(path: &Path) -> anyhow::Result<Schema> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Schema::parse_str(&text).with_context(|| format!("parse {}", path.display()))
}

fn releases() -> anyhow::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root().join("tests/fixtures/releases"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("schemas").is_dir())
        .collect();
    out.sort();
    Ok(out)
}

#[test]
fn current_schemas_read_every_release_and_are_read_by_it() -> anyhow::Result<()> {
    let releases = releases()?;
    anyhow::ensure!(
        !releases.is_empty(),
        "no release fixtures under tests/fixtures/releases"
    );
    for release in &releases {
        for name in SCHEMAS {
            let old = parse(&release.join("schemas").join(name))?;
            let new = parse(&root().join("schemas").join(name))?;
            SchemaCompatibility::can_read(&old, &new)
                .map_err(|e| anyhow::anyhow!("{name}: events of {} unreadable now: {e}", release.display()))?;
            SchemaCompatibility::can_read(&new, &old)
                .map_err(|e| anyhow::anyhow!("{name}: {} cannot read events written now: {e}", release.display()))?;
        }
    }
    Ok(())
}

/// The check catches what breaks the rule: a field added without a default (old events lack
/// it) and a retyped field; a field added with a default passes.
#[test]
fn the_check_refuses_a_field_without_default_and_a_retyped_field() -> anyhow::Result<()> {
    let path = root().join("schemas/position_event.avsc");
    let current = parse(&path)?;
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let fields = json["fields"].as_array().context("a record schema")?.clone();

    let mut with_default = fields.clone();
    with_default.push(serde_json::json!({"name": "venue_note", "type": ["null", "string"], "default": null}));
    let mut without_default = fields.clone();
    without_default.push(serde_json::json!({"name": "venue_note", "type": "string"}));
    let mut retyped = fields.clone();
    let position = retyped
        .iter_mut()
        .find(|f| f["name"] == "position")
        .context("a position field")?;
    position["type"] = serde_json::json!("string");

    let with = |fields: Vec<serde_json::Value>| -> anyhow::Result<Schema> {
        let mut j = json.clone();
        j["fields"] = serde_json::Value::Array(fields);
        Ok(Schema::parse_str(&j.to_string())?)
    };
    SchemaCompatibility::mutual_read(&current, &with(with_default)?)
        .map_err(|e| anyhow::anyhow!("a field with a default must pass: {e}"))?;
    anyhow::ensure!(
        SchemaCompatibility::can_read(&current, &with(without_default)?).is_err(),
        "a field without a default passed"
    );
    anyhow::ensure!(
        SchemaCompatibility::mutual_read(&current, &with(retyped)?).is_err(),
        "a retyped field passed"
    );
    Ok(())
}
