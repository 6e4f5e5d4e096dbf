//! Object storage of the tables: one bounded start-up probe of an `s3://` location.
//!
//! A wrong bucket, wrong credentials or an unreachable endpoint would otherwise surface from
//! deep inside delta-rs as a multi-line error, and an unreachable endpoint only after
//! object_store's retries (up to 10 attempts over 3 minutes per request). [`probe`] asks the
//! bucket once, within `--storage-timeout`, through the same object store delta-rs builds (the
//! same `AWS_*` variables), and names the setting to fix in one line. Local paths need no probe.
//!
//! The probe is a GET of a key that never exists below the table prefix: `404 NoSuchKey` (or
//! the object) means the bucket answers and accepts the credentials; `404 NoSuchBucket`, `403`,
//! a redirect and a connection error each get their own [`StorageError`].

use std::time::Duration;

/// How long the start-up probe may take by default.
pub const DEFAULT_STORAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// A storage location that cannot be used, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The bucket does not exist at the endpoint.
    #[error("bucket {bucket:?} does not exist at {endpoint}: create it, or fix the bucket in --table-uri / POSSYNC_TABLE_URI ({uri})")]
    MissingBucket {
        bucket: String,
        endpoint: String,
        uri: String,
    },
    /// The endpoint refused the credentials (or their permissions).
    #[error("{endpoint} refused the credentials for bucket {bucket:?} ({code}): {fix}")]
    Credentials {
        bucket: String,
        endpoint: String,
        code: String,
        fix: &'static str,
    },
    /// The bucket lives in another region than the one requests are signed for.
    #[error("bucket {bucket:?} is not in the region requests are signed for ({code}): set AWS_REGION to the bucket's region")]
    Region { bucket: String, code: String },
    /// Nothing answered in time, or the connection failed.
    #[error("S3 endpoint {endpoint} unreachable ({cause}): check AWS_ENDPOINT_URL (unset for AWS S3); --storage-timeout / POSSYNC_STORAGE_TIMEOUT bounds this check")]
    Unreachable { endpoint: String, cause: String },
    /// An `http://` endpoint without `AWS_ALLOW_HTTP`.
    #[error("S3 endpoint {endpoint} is plain http: set AWS_ALLOW_HTTP=true to allow it (or use https)")]
    PlainHttp { endpoint: String },
    /// The URI names object storage this build was compiled without.
    #[error("table location {uri} needs S3 support: rebuild with `cargo build --release --features s3` (the Docker image has it)")]
    NoS3Support { uri: String },
    /// The location or the `AWS_*` settings do not make an object store.
    #[error("S3 settings for {uri} are invalid: {cause}")]
    Config { uri: String, cause: String },
    /// The key may read but not write (or delete).
    #[error("{endpoint} refused a {what} in bucket {bucket:?} ({code}): the key must read, write and delete objects (s3:GetObject, s3:PutObject, s3:DeleteObject, s3:ListBucket); check its policy or AWS_ACCESS_KEY_ID")]
    ReadOnly {
        bucket: String,
        endpoint: String,
        what: &'static str,
        code: String,
    },
    /// A second put-if-absent of one key succeeded: the store does not make conditional writes
    /// atomic, and two writers' commits could overwrite each other.
    #[error("{endpoint} accepted a second put-if-absent of one key (If-None-Match ignored): Delta commits need conditional writes, or two writers overwrite each other's commits. Use a store that supports them (AWS S3, MinIO, R2) and leave AWS_CONDITIONAL_PUT unset (etag)")]
    NoConditionalPut { endpoint: String },
    /// Conditional writes are switched off in the settings.
    #[error(
        "conditional writes are disabled ({cause}): Delta commits need them; unset AWS_CONDITIONAL_PUT (default etag)"
    )]
    ConditionalPutDisabled { cause: String },
    /// Any other answer.
    #[error("S3 check of {uri} at {endpoint} failed: {cause}")]
    Other {
        uri: String,
        endpoint: String,
        cause: String,
    },
}

/// Whether `uri` names S3-compatible object storage.
pub fn is_s3(uri: &str) -> bool {
    uri.starts_with("s3://") || uri.starts_with("s3a://")
}

/// What a command does with the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads only (`status`, `book`, `registry history`): a read-only key is enough.
    Read,
    /// Writes Delta commits (`materialize`, `maintain`, `rebuild`'s target).
    Write,
}

/// Checks that the tables' location can be used, within `timeout` per request: for `s3://`
/// locations, the bucket exists, answers and takes the credentials; for [`Access::Write`]
/// also that the key may write and delete and that the store makes conditional writes atomic
/// (a probe object put if absent twice, then deleted). Local paths pass at once.
///
/// # Errors
/// A [`StorageError`] naming the setting to change.
pub async fn probe(uri: &str, timeout: Duration, access: Access) -> Result<(), StorageError> {
    if !is_s3(uri) {
        return Ok(());
    }
    s3::probe(uri, timeout, access).await
}

/// The endpoint as configured (`AWS_ENDPOINT_URL`, or its aliases), for messages and checks.
pub fn endpoint() -> Option<String> {
    ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

#[cfg_attr(not(feature = "s3"), allow(dead_code))]
fn endpoint_name() -> String {
    endpoint().unwrap_or_else(|| {
        let region = std::env::var("AWS_REGION")
            .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|_| "us-east-1".into());
        format!("AWS S3 ({region})")
    })
}

/// An error chain on one line: sources joined, whitespace collapsed.
#[cfg_attr(not(feature = "s3"), allow(dead_code))]
fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ").split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `text` cut at 300 characters, for a message.
#[cfg_attr(not(feature = "s3"), allow(dead_code))]
fn clip(text: &str) -> String {
    match text.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// The S3 error code (`<Code>…</Code>` of the XML body) somewhere in an error's text.
#[cfg_attr(not(feature = "s3"), allow(dead_code))]
fn s3_code(text: &str) -> Option<&str> {
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    Some(&text[start..start + len])
}

#[cfg(feature = "s3")]
mod s3 {
    use std::time::Duration;

    use deltalake::logstore::object_store::{self, client::HttpError, path::Path, ObjectStoreExt};

    use super::{clip, endpoint, endpoint_name, one_line, s3_code, Access, StorageError};

    pub(super) async fn probe(uri: &str, timeout: Duration, access: Access) -> Result<(), StorageError> {
        let config = |cause: String| StorageError::Config {
            uri: uri.to_string(),
            cause,
        };
        let url = url::Url::parse(uri).map_err(|e| config(e.to_string()))?;
        let bucket = url.host_str().unwrap_or_default().to_string();
        if let Some(ep) = endpoint() {
            let allowed = std::env::var("AWS_ALLOW_HTTP")
                .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "on" | "yes" | "y"));
            if ep.starts_with("http://") && !allowed {
                return Err(StorageError::PlainHttp { endpoint: ep });
            }
        }
        // Few quick retries: a refused connection is reported with its cause, not waited out.
        let options = [
            ("max_retries".to_string(), "2".to_string()),
            (
                "retry_timeout".to_string(),
                humantime::format_duration(timeout).to_string(),
            ),
        ];
        let store = deltalake::logstore::store_for(&url, options).map_err(|e| config(clip(&one_line(&e))))?;
        // The store is rooted at the table prefix of `uri`.
        let key = Path::from(format!("_possync_probe_{}", uuid::Uuid::new_v4().simple()));
        let endpoint = endpoint_name();
        let answer = match tokio::time::timeout(timeout, store.get(&key)).await {
            Err(_) => {
                return Err(StorageError::Unreachable {
                    endpoint,
                    cause: format!("no answer within {}", humantime::format_duration(timeout)),
                })
            }
            Ok(answer) => answer,
        };
        match answer {
            // Absent, as it should be (a bucket that is missing is a NotFound too).
            Ok(_) => {}
            Err(ref e @ object_store::Error::NotFound { .. }) if s3_code(&one_line(e)) != Some("NoSuchBucket") => {}
            Err(e) => return classify(e, uri, bucket),
        }
        match access {
            Access::Read => Ok(()),
            Access::Write => write_probe(store.as_ref(), &key, bucket, timeout).await,
        }
    }

    /// Puts a probe object if absent twice: the first must succeed (the key may write), the
    /// second must be refused (the store makes conditional writes atomic, which Delta commits
    /// rely on); then deletes it (the key may delete, which vacuum needs).
    async fn write_probe(
        store: &dyn object_store::ObjectStore,
        key: &Path,
        bucket: String,
        timeout: Duration,
    ) -> Result<(), StorageError> {
        use object_store::{PutMode, PutOptions, PutPayload};
        let endpoint = endpoint_name();
        let bounded = |what: String| StorageError::Unreachable {
            endpoint: endpoint.clone(),
            cause: format!("{what}: no answer within {}", humantime::format_duration(timeout)),
        };
        let refused = |what: &'static str, e: &object_store::Error| -> Option<StorageError> {
            let text = one_line(e);
            matches!(
                e,
                object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
            )
            .then(|| StorageError::ReadOnly {
                bucket: bucket.clone(),
                endpoint: endpoint.clone(),
                what,
                code: s3_code(&text).unwrap_or("403").to_string(),
            })
        };
        let create = || PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let payload = || PutPayload::from_static(b"possync start-up probe: safe to delete");
        let first = tokio::time::timeout(timeout, store.put_opts(key, payload(), create()))
            .await
            .map_err(|_| bounded("put".into()))?;
        match first {
            Ok(_) => {}
            Err(e @ object_store::Error::NotImplemented { .. }) => {
                return Err(StorageError::ConditionalPutDisabled {
                    cause: clip(&one_line(&e)),
                })
            }
            Err(e) => {
                return Err(refused("put", &e).unwrap_or_else(|| StorageError::Other {
                    uri: format!("s3://{bucket}"),
                    endpoint: endpoint.clone(),
                    cause: clip(&one_line(&e)),
                }))
            }
        }
        let second = tokio::time::timeout(timeout, store.put_opts(key, payload(), create()))
            .await
            .map_err(|_| bounded("second put".into()));
        let outcome = match second {
            Err(e) => Err(e),
            Ok(Ok(_)) => Err(StorageError::NoConditionalPut {
                endpoint: endpoint.clone(),
            }),
            Ok(Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. })) => Ok(()),
            Ok(Err(e)) => Err(StorageError::Other {
                uri: format!("s3://{bucket}"),
                endpoint: endpoint.clone(),
                cause: clip(&one_line(&e)),
            }),
        };
        let deleted = tokio::time::timeout(timeout, store.delete(key))
            .await
            .map_err(|_| bounded("delete".into()))?;
        outcome?;
        match deleted {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(refused("delete", &e).unwrap_or_else(|| StorageError::Other {
                uri: format!("s3://{bucket}"),
                endpoint,
                cause: clip(&one_line(&e)),
            })),
        }
    }

    /// The error of a failed read probe, naming the setting to change.
    fn classify(e: object_store::Error, uri: &str, bucket: String) -> Result<(), StorageError> {
        let endpoint = endpoint_name();
        let text = one_line(&e);
        let code = s3_code(&text).unwrap_or_default().to_string();
        match &e {
            object_store::Error::NotFound { .. } if code == "NoSuchBucket" => Err(StorageError::MissingBucket {
                bucket,
                endpoint,
                uri: uri.to_string(),
            }),
            _ if code == "AuthorizationHeaderMalformed"
                || code == "PermanentRedirect"
                || text.contains("incorrectly configured region") =>
            {
                Err(StorageError::Region {
                    bucket,
                    code: if code.is_empty() { "redirect".into() } else { code },
                })
            }
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                let fix = match code.as_str() {
                    "InvalidAccessKeyId" => "the key id is unknown; check AWS_ACCESS_KEY_ID",
                    "SignatureDoesNotMatch" => "the secret does not match the key id; check AWS_SECRET_ACCESS_KEY",
                    "ExpiredToken" | "InvalidToken" | "TokenRefreshRequired" => {
                        "the session token is invalid or expired; renew AWS_SESSION_TOKEN"
                    }
                    _ => "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, and that the key may read and write the bucket (s3:GetObject, s3:PutObject, s3:DeleteObject, s3:ListBucket)",
                };
                Err(StorageError::Credentials {
                    bucket,
                    endpoint,
                    code: if code.is_empty() { "403".into() } else { code },
                    fix,
                })
            }
            _ if is_connection(&e) => Err(StorageError::Unreachable {
                endpoint,
                cause: clip(&root_cause(&e)),
            }),
            _ => Err(StorageError::Other {
                uri: uri.to_string(),
                endpoint,
                cause: clip(&text),
            }),
        }
    }

    /// The innermost error of a chain (e.g. "tcp connect error: Connection refused").
    fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
        let mut cur = e;
        while let Some(s) = cur.source() {
            cur = s;
        }
        cur.to_string()
    }

    /// Whether the request never got an HTTP answer (connect, DNS, timeout).
    fn is_connection(e: &object_store::Error) -> bool {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = source {
            if s.downcast_ref::<HttpError>().is_some() {
                return true;
            }
            source = s.source();
        }
        false
    }
}

#[cfg(not(feature = "s3"))]
mod s3 {
    use std::time::Duration;

    use super::{Access, StorageError};

    pub(super) async fn probe(uri: &str, _timeout: Duration, _access: Access) -> Result<(), StorageError> {
        Err(StorageError::NoS3Support { uri: uri.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_codes_are_found_in_error_text() {
        let text = "Error performing GET http://x/b/k in 1ms - Server returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>gone</Message></Error>";
        assert_eq!(s3_code(text), Some("NoSuchBucket"));
        assert_eq!(s3_code("404 Not Found"), None);
    }

    #[tokio::test]
    async fn local_paths_need_no_probe() {
        assert!(probe("/tmp/somewhere", Duration::from_millis(1), Access::Write)
            .await
            .is_ok());
    }

    #[cfg(not(feature = "s3"))]
    #[tokio::test]
    async fn s3_without_the_feature_names_the_feature() {
        let e = probe("s3://b/p", Duration::from_secs(1), Access::Read)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("--features s3"), "{e}");
    }
}
