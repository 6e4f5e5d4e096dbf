//! `--schema-registry-url`: frame values with the ids a Confluent-compatible schema registry
//! gives, instead of the fixed ids of [`crate::schema`].
//!
//! At start-up every producing or consuming subcommand registers the embedded `schemas/*.avsc`
//! under the subjects of its topics (TopicNameStrategy, `<topic>-value`): `PositionEvent` under
//! `<prefix>positions.active-value` and `<prefix>positions.queued-value`, `RegistryEvent` under
//! `<prefix>registry-value`. Registering is idempotent (an identical schema keeps its id), so
//! producers and consumers all learn the same ids, once, and keep them for the life of the
//! process ([`crate::schema::use_ids`]). Without the flag nothing here runs and the fixed ids
//! stay.
//!
//! The registry is spoken to over its Confluent REST API (`POST /subjects/{subject}/versions`,
//! `GET /schemas/ids/{id}`): Confluent Schema Registry, Karapace, or Apicurio Registry's
//! compatibility API (`http://host:port/apis/ccompat/v6` on Apicurio 2, `…/v7` on 3).

use std::time::Duration;

use serde::Deserialize;

use crate::kafka::Topics;
use crate::schema::{self, SchemaIds};

/// The media type of the Confluent schema registry API.
const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// `--schema-registry-url`, its credentials and timeout; flattened into every subcommand that
/// produces or consumes possync's Avro values.
#[derive(clap::Args, Clone, Default)]
pub struct SchemaRegistryArgs {
    /// Confluent-compatible schema registry to register `schemas/*.avsc` with (subjects
    /// `<topic>-value`); values are then framed with the ids it returns instead of the fixed
    /// ids 1 and 2. Give the base of its Confluent API, e.g. `http://127.0.0.1:8081`, or
    /// `http://host:port/apis/ccompat/v7` for Apicurio Registry. Producers and consumers of one
    /// pipeline must all use it, or none. Credentials go in the user and password flags (a
    /// `user:password@` in the URL works too, and is never printed).
    #[arg(long, env = "POSSYNC_SCHEMA_REGISTRY_URL", hide_env_values = true)]
    pub schema_registry_url: Option<String>,
    /// User for the schema registry's HTTP basic authentication.
    #[arg(long, env = "POSSYNC_SCHEMA_REGISTRY_USER")]
    pub schema_registry_user: Option<String>,
    /// Password for the schema registry's HTTP basic authentication (prefer the environment
    /// variable: a flag shows in the process list). Never printed.
    #[arg(long, env = "POSSYNC_SCHEMA_REGISTRY_PASSWORD", hide_env_values = true)]
    pub schema_registry_password: Option<String>,
    /// How long one request to the schema registry may take.
    #[arg(long, env = "POSSYNC_SCHEMA_REGISTRY_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub schema_registry_timeout: Duration,
}

impl std::fmt::Debug for SchemaRegistryArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistryArgs")
            .field("schema_registry_url", &self.schema_registry_url.as_deref().map(shown))
            .field("schema_registry_user", &self.schema_registry_user)
            .field(
                "schema_registry_password",
                &self.schema_registry_password.as_ref().map(|_| crate::kafka::REDACTED),
            )
            .field("schema_registry_timeout", &self.schema_registry_timeout)
            .finish()
    }
}

/// `url` fit to print: any `user:password@` replaced (issue 20 #11).
pub fn shown(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}{}@{}", &url[..scheme + 3], crate::kafka::REDACTED, &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Basic-authentication credentials.
#[derive(Clone)]
struct Credentials {
    user: String,
    password: Option<String>,
}

/// Why the schema registry could not give possync its ids.
#[derive(Debug, thiserror::Error)]
pub enum SchemaRegistryError {
    /// The URL is not an http(s) URL.
    #[error("--schema-registry-url {0:?} is not an http:// or https:// URL")]
    BadUrl(String),
    /// No answer (connection refused, DNS, timeout).
    #[error("schema registry {url} is unreachable ({reason}); start it, or fix or drop --schema-registry-url")]
    Unreachable { url: String, reason: String },
    /// The registry answered with an error status.
    #[error(
        "schema registry {url} refused {what}: HTTP {status}: {message}; is --schema-registry-url the base of a \
         Confluent-compatible API (Apicurio: …/apis/ccompat/v7)?"
    )]
    Refused {
        url: String,
        what: String,
        status: u16,
        message: String,
    },
    /// The subject's compatibility level refuses this build's schema (HTTP 409).
    #[error(
        "schema registry {url} refuses this build's schema under subject {subject} as incompatible with the \
         versions it holds ({message}); the subject was written by something other than possync, or its \
         compatibility level is stricter than possync's rule (fields added with defaults): check GET \
         /config/{subject} and /subjects/{subject}/versions, or use another --topic-prefix"
    )]
    Incompatible {
        url: String,
        subject: String,
        message: String,
    },
    /// The answer is not what the Confluent API returns.
    #[error(
        "schema registry {url} answered {what} with an unexpected body ({reason}); is --schema-registry-url the base \
         of a Confluent-compatible API?"
    )]
    BadResponse { url: String, what: String, reason: String },
    /// One schema got two ids under two subjects: possync frames one schema with one id.
    #[error(
        "schema registry {url} gave {schema} id {first} under {first_subject} but {second} under {second_subject}; \
         possync needs one id per schema (Confluent registries give identical schemas one id; on Apicurio keep \
         legacy-id-mode off)"
    )]
    SplitIds {
        url: String,
        schema: &'static str,
        first_subject: String,
        first: u32,
        second_subject: String,
        second: u32,
    },
    /// This process already uses other ids.
    #[error("this process already frames values with schema ids {0:?}; one process, one schema registry")]
    AlreadySet(SchemaIds),
}

/// A client of one schema registry.
#[derive(Clone)]
pub struct SchemaRegistry {
    /// The base URL, without credentials.
    base: String,
    auth: Option<Credentials>,
    http: reqwest::Client,
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistry")
            .field("base", &self.base)
            .field("user", &self.auth.as_ref().map(|a| &a.user))
            .finish()
    }
}

#[derive(Deserialize)]
struct IdReply {
    id: u32,
}

#[derive(Deserialize)]
struct SchemaReply {
    schema: String,
}

#[derive(Deserialize)]
struct ErrorReply {
    message: Option<String>,
}

impl SchemaRegistry {
    /// A client of the registry at `url` (the base of its Confluent API); credentials in the
    /// URL (`http://user:password@host`) are taken out of it and sent as basic authentication.
    ///
    /// # Errors
    /// [`SchemaRegistryError::BadUrl`] when `url` is not http(s).
    pub fn new(url: &str, timeout: Duration) -> Result<Self, SchemaRegistryError> {
        Self::with_auth(url, None, None, timeout)
    }

    /// [`SchemaRegistry::new`] with basic-authentication credentials (they win over any in the
    /// URL).
    ///
    /// # Errors
    /// [`SchemaRegistryError::BadUrl`] when `url` is not http(s).
    pub fn with_auth(
        url: &str,
        user: Option<&str>,
        password: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, SchemaRegistryError> {
        let trimmed = url.trim().trim_end_matches('/');
        let bad = || SchemaRegistryError::BadUrl(shown(url));
        if !(trimmed.starts_with("http://") || trimmed.starts_with("https://")) || trimmed.len() <= "https://".len() {
            return Err(bad());
        }
        let mut parsed = url::Url::parse(trimmed).map_err(|_| bad())?;
        let decode = |s: &str| percent_decode(s);
        let mut auth = (!parsed.username().is_empty()).then(|| Credentials {
            user: decode(parsed.username()),
            password: parsed.password().map(decode),
        });
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        if let Some(user) = user.filter(|u| !u.is_empty()) {
            auth = Some(Credentials {
                user: user.to_string(),
                password: password.map(str::to_string),
            });
        }
        let base = parsed.as_str().trim_end_matches('/').to_string();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| SchemaRegistryError::BadUrl(format!("{} ({})", shown(url), chain(&e))))?;
        Ok(Self { base, auth, http })
    }

    /// A request to `url` with the credentials, if any.
    fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let req = self.http.request(method, url);
        match &self.auth {
            Some(a) => req.basic_auth(&a.user, a.password.as_deref()),
            None => req,
        }
    }

    /// The base URL requests go to.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Registers `schema` (Avro, as text) under `subject`; the registry's id for it (an
    /// identical schema already registered keeps its id).
    ///
    /// # Errors
    /// [`SchemaRegistryError`] when the registry is unreachable or refuses.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, SchemaRegistryError> {
        let what = format!("registering a schema under subject {subject}");
        let body = serde_json::json!({ "schema": schema, "schemaType": "AVRO" }).to_string();
        let url = format!("{}/subjects/{}/versions", self.base, path_segment(subject));
        let req = self
            .request(reqwest::Method::POST, url)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .header(reqwest::header::ACCEPT, CONTENT_TYPE)
            .body(body);
        match self.call::<IdReply>(req, &what).await {
            Ok(reply) => Ok(reply.id),
            // 409: the subject's compatibility level refuses the schema.
            Err(SchemaRegistryError::Refused {
                url,
                status: 409,
                message,
                ..
            }) => Err(SchemaRegistryError::Incompatible {
                url,
                subject: subject.to_string(),
                message: message.replace('\n', " "),
            }),
            Err(e) => Err(e),
        }
    }

    /// The schema text the registry holds under `id`.
    ///
    /// # Errors
    /// [`SchemaRegistryError`] when the registry is unreachable, or has no schema `id`.
    pub async fn schema(&self, id: u32) -> Result<String, SchemaRegistryError> {
        let what = format!("looking up schema id {id}");
        let req = self
            .request(reqwest::Method::GET, format!("{}/schemas/ids/{id}", self.base))
            .header(reqwest::header::ACCEPT, CONTENT_TYPE);
        let reply: SchemaReply = self.call(req, &what).await?;
        Ok(reply.schema)
    }

    /// Registers the three schemas under the subjects of `topics`; the ids to frame values with.
    ///
    /// # Errors
    /// [`SchemaRegistryError`], including [`SchemaRegistryError::SplitIds`] when one schema got
    /// different ids under its two subjects.
    pub async fn register_all(&self, topics: &Topics) -> Result<SchemaIds, SchemaRegistryError> {
        let mut position = None::<(String, u32)>;
        for topic in [&topics.active, &topics.queued] {
            let subject = value_subject(topic);
            let id = self.register(&subject, schema::POSITION_EVENT_AVSC).await?;
            match &position {
                None => position = Some((subject, id)),
                Some((first_subject, first)) if *first != id => {
                    return Err(SchemaRegistryError::SplitIds {
                        url: self.base.clone(),
                        schema: "PositionEvent",
                        first_subject: first_subject.clone(),
                        first: *first,
                        second_subject: subject,
                        second: id,
                    })
                }
                Some(_) => {}
            }
        }
        let registry_event = self
            .register(&value_subject(&topics.registry), schema::REGISTRY_EVENT_AVSC)
            .await?;
        let execution_event = self
            .register(&value_subject(&topics.executions), schema::EXECUTION_EVENT_AVSC)
            .await?;
        Ok(SchemaIds {
            position_event: position.map(|(_, id)| id).unwrap_or_default(),
            registry_event,
            execution_event,
        })
    }

    async fn call<T: for<'de> Deserialize<'de>>(
        &self,
        req: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<T, SchemaRegistryError> {
        let resp = req.send().await.map_err(|e| SchemaRegistryError::Unreachable {
            url: self.base.clone(),
            reason: chain(&e),
        })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| SchemaRegistryError::Unreachable {
            url: self.base.clone(),
            reason: chain(&e),
        })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorReply>(&body)
                .ok()
                .and_then(|e| e.message)
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(SchemaRegistryError::Refused {
                url: self.base.clone(),
                what: what.to_string(),
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| SchemaRegistryError::BadResponse {
            url: self.base.clone(),
            what: what.to_string(),
            reason: e.to_string(),
        })
    }
}

/// The value subject of a topic under TopicNameStrategy: `<topic>-value`.
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

/// When `args` names a registry: registers the schemas for `topics` and makes this process frame
/// and accept values with the registry's ids. The ids in use afterwards.
///
/// # Errors
/// [`SchemaRegistryError`]; nothing is changed then.
pub async fn apply(args: &SchemaRegistryArgs, topics: &Topics) -> Result<SchemaIds, SchemaRegistryError> {
    let Some(url) = args.schema_registry_url.as_deref().filter(|u| !u.trim().is_empty()) else {
        return Ok(schema::ids());
    };
    let registry = SchemaRegistry::with_auth(
        url,
        args.schema_registry_user.as_deref(),
        args.schema_registry_password.as_deref(),
        args.schema_registry_timeout,
    )?;
    let ids = registry.register_all(topics).await?;
    schema::use_ids(ids).map_err(SchemaRegistryError::AlreadySet)?;
    let _ = IN_USE.set(registry.clone());
    tracing::info!(
        registry = registry.url(),
        position_event = ids.position_event,
        registry_event = ids.registry_event,
        "schema ids from the schema registry"
    );
    Ok(ids)
}

/// The registry this process registered with ([`apply`]), for [`learn`].
static IN_USE: std::sync::OnceLock<SchemaRegistry> = std::sync::OnceLock::new();

/// Ids the registry in use has no possync event under (asked once each).
static NOT_OURS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<u32>>> =
    std::sync::LazyLock::new(Default::default);

/// Makes the writer schema of `id` known to this process ([`schema::writer`]) by asking the
/// registry in use for it: a value framed with an id this build did not register (a newer or
/// older producer's version of the record) is then decoded by its own schema and resolved to
/// this build's. Returns whether the schema is known now; `Ok(false)` without a registry or
/// when the id names something else than possync's events (such values become dead letters,
/// saying so).
///
/// # Errors
/// [`SchemaRegistryError`] when the registry cannot answer: the caller must not decode the
/// value yet (a dead letter would lose an event that is only unreadable for a moment).
pub async fn learn(id: u32) -> Result<bool, SchemaRegistryError> {
    if schema::knows(id) {
        return Ok(true);
    }
    let Some(registry) = IN_USE.get() else {
        return Ok(false);
    };
    let not_ours = || {
        NOT_OURS.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
        Ok(false)
    };
    if NOT_OURS.lock().unwrap_or_else(|e| e.into_inner()).contains(&id) {
        return Ok(false);
    }
    let text = match registry.schema(id).await {
        Ok(text) => text,
        // No such id: nothing to learn; the value becomes a dead letter naming the id.
        Err(SchemaRegistryError::Refused { status: 404, .. }) => return not_ours(),
        Err(e) => return Err(e),
    };
    match schema::learn(id, &text) {
        Ok(w) => {
            tracing::info!(
                id,
                record = w.record.name(),
                registry = registry.url(),
                "learned a writer schema from the schema registry"
            );
            Ok(true)
        }
        Err(e) => {
            tracing::warn!(id, error = %e, "schema id from the registry is not one of possync's events");
            not_ours()
        }
    }
}

/// Before a consumer decodes `value`: when its frame names a writer schema this process does
/// not know, [`learn`] it (a no-op without a registry, and for values it can decode already).
///
/// # Errors
/// As [`learn`].
pub async fn learn_writer_of(value: Option<&[u8]>) -> Result<(), SchemaRegistryError> {
    if let Some((id, _)) = value.and_then(|v| crate::events::split_confluent(v).ok()) {
        if !schema::knows(id) {
            learn(id).await?;
        }
    }
    Ok(())
}

/// Percent-encodes everything but unreserved characters (topic names are `[a-zA-Z0-9._-]`, so
/// this rarely changes anything).
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `%XX` escapes decoded (the user and password of a URL's userinfo).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An error and its sources on one line (reqwest's own text names only the outermost).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_topic_name_strategy() {
        let t = Topics::new("p.");
        assert_eq!(value_subject(&t.active), "p.positions.active-value");
        assert_eq!(path_segment("a.b-c_d"), "a.b-c_d");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn bad_urls_are_refused() {
        for u in ["", "127.0.0.1:8081", "ftp://x", "http://"] {
            assert!(matches!(
                SchemaRegistry::new(u, Duration::from_secs(1)),
                Err(SchemaRegistryError::BadUrl(_))
            ));
        }
    }

    #[tokio::test]
    async fn unreachable_registry_is_one_line_naming_the_flag() {
        // A port nothing listens on: bind, read the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = SchemaRegistry::new(&format!("http://127.0.0.1:{port}"), Duration::from_secs(2)).unwrap();
        let e = r.register_all(&Topics::new("p.")).await.unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, SchemaRegistryError::Unreachable { .. }), "{text}");
        assert!(text.contains("--schema-registry-url") && !text.contains('\n'), "{text}");
    }

    /// Issue 20 #11: credentials in the URL never reach a log line, an error or `Debug`; they
    /// are sent as basic authentication, as are those of the user and password flags.
    #[tokio::test]
    async fn credentials_are_sent_never_shown() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut heads = Vec::new();
            for _ in 0..2 {
                let (mut c, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 16 * 1024];
                let n = c.read(&mut buf).await.unwrap();
                heads.push(String::from_utf8_lossy(&buf[..n]).to_lowercase());
                let body = r#"{"id":5}"#;
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                c.write_all(reply.as_bytes()).await.unwrap();
            }
            heads
        });
        let url = format!("http://u%40x:hunter2-secret@127.0.0.1:{port}/apis/ccompat/v7");
        let r = SchemaRegistry::new(&url, Duration::from_secs(5)).unwrap();
        assert_eq!(r.url(), format!("http://127.0.0.1:{port}/apis/ccompat/v7"));
        assert!(!format!("{r:?}").contains("hunter2"));
        assert_eq!(r.register("s-value", "\"string\"").await.unwrap(), 5);
        let flags = SchemaRegistry::with_auth(
            &format!("http://127.0.0.1:{port}"),
            Some("svc"),
            Some("pw-from-flag"),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(flags.register("s-value", "\"string\"").await.unwrap(), 5);
        let heads = server.await.unwrap();
        // base64("u@x:hunter2-secret"), base64("svc:pw-from-flag")
        assert!(
            heads[0].contains("authorization: basic dub4omh1bnrlcjitc2vjcmv0"),
            "{}",
            heads[0]
        );
        assert!(
            heads[1].contains("authorization: basic c3zjonb3lwzyb20tzmxhzw=="),
            "{}",
            heads[1]
        );
        // Unreachable: the error names the registry without the password.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = SchemaRegistry::new(
            &format!("http://u:hunter2-secret@127.0.0.1:{closed}"),
            Duration::from_secs(2),
        )
        .unwrap();
        let e = r.register_all(&Topics::new("p.")).await.unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let bad = SchemaRegistry::new("ftp://u:hunter2-secret@x", Duration::from_secs(1)).unwrap_err();
        assert!(!bad.to_string().contains("hunter2"), "{bad}");
        let args = SchemaRegistryArgs {
            schema_registry_url: Some("http://u:hunter2-secret@h:1".into()),
            schema_registry_password: Some("hunter2-secret".into()),
            ..Default::default()
        };
        assert!(!format!("{args:?}").contains("hunter2"));
    }
}
