//! Optional API-key authentication: `authorization: Bearer <key>` (the scheme in any case).
//!
//! The keys file has one key per line; blank lines and lines whose first non-blank character is
//! `#` are ignored. A key never contains white space or `#`, so a trailing comment is an error,
//! never part of a key; a file without a single key is an error, never "authentication off".
//! The file is read again every reload interval (a Kubernetes Secret rotation replaces it); a
//! reload that fails keeps the previous keys and says why in the log.

use kd_runtime::ServiceError;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tonic::{Request, Status};

/// Accepted keys; `None` = authentication off (no `--api-keys-file`).
#[derive(Clone, Debug, Default)]
pub struct ApiKeys(Option<Arc<KeyFile>>);

#[derive(Debug)]
struct KeyFile {
    path: PathBuf,
    keys: RwLock<Vec<Box<[u8]>>>,
}

/// Reads the keys in `text`: one per line, `#` comments on their own lines.
pub fn parse_keys(text: &str) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.contains(|c: char| c.is_whitespace() || c == '#') {
            return Err(format!(
                "line {}: a key may not contain white space or '#'; allowed: one key per line, \
                 comments on lines of their own",
                n + 1
            ));
        }
        keys.push(line.to_string());
    }
    if keys.is_empty() {
        return Err(
            "no key in the file (only blank lines and comments); allowed: at least one \
                    key, or no --api-keys-file to run without authentication"
                .into(),
        );
    }
    Ok(keys)
}

fn read_keys(path: &Path) -> Result<Vec<Box<[u8]>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    Ok(parse_keys(&text)?
        .into_iter()
        .map(|k| k.into_bytes().into_boxed_slice())
        .collect())
}

/// `given == secret` in a time that depends only on `given`'s length (which the caller knows).
fn constant_time_eq(secret: &[u8], given: &[u8]) -> bool {
    if secret.is_empty() {
        return false;
    }
    let mut diff = u8::from(secret.len() != given.len());
    for (i, &g) in given.iter().enumerate() {
        diff |= g ^ secret[i % secret.len()];
    }
    std::hint::black_box(diff) == 0
}

/// The token of an `authorization` value `<scheme> <token>` whose scheme is `Bearer` in any case.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(char::is_whitespace)?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl ApiKeys {
    /// Authentication off.
    pub fn off() -> Self {
        Self(None)
    }

    /// The keys of `--api-keys-file` (`None`: off) re-read every `reload_secs`, said in the log
    /// either way; an error names the flag.
    pub fn from_flags(file: Option<&Path>, reload_secs: f64) -> Result<Self, String> {
        if !(reload_secs.is_finite() && (0.001..=86_400.0).contains(&reload_secs)) {
            return Err(format!(
                "--api-keys-reload-secs {reload_secs}; allowed: 0.001..=86400 seconds"
            ));
        }
        let Some(path) = file else {
            tracing::warn!("authentication off: no --api-keys-file, every caller is served");
            return Ok(Self::off());
        };
        let keys = Self::from_file(path)
            .map_err(|e| format!("--api-keys-file {}: {e}", path.display()))?;
        tracing::info!(
            path = %path.display(),
            keys = keys.len(),
            reload_secs,
            "API-key authentication on"
        );
        Ok(keys)
    }

    /// The keys of `path` (see the module rules); an unreadable file or one without a key is an
    /// error.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let keys = read_keys(path)?;
        Ok(Self(Some(Arc::new(KeyFile {
            path: path.to_path_buf(),
            keys: RwLock::new(keys),
        }))))
    }

    /// How many keys are accepted (0 = authentication off).
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |f| f.read().len())
    }

    /// Whether authentication is off.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Reads the file again: `Ok(true)` when the keys changed, an error (the previous keys
    /// kept) when the file cannot be read or holds no valid key.
    pub fn reload(&self) -> Result<bool, String> {
        let Some(file) = &self.0 else {
            return Ok(false);
        };
        let keys = read_keys(&file.path)?;
        let mut current = file.keys.write().unwrap_or_else(|e| e.into_inner());
        let changed = *current != keys;
        *current = keys;
        Ok(changed)
    }

    /// Reloads the file every `interval` until the returned task is aborted.
    pub fn spawn_reloader(&self, interval: Duration) -> Option<tokio::task::JoinHandle<()>> {
        let file = self.0.as_ref()?;
        let (keys, path) = (self.clone(), file.path.display().to_string());
        Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                match keys.reload() {
                    Ok(true) => tracing::info!(path, keys = keys.len(), "API keys reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(path, error = %e, "API keys not reloaded; the previous keys stay")
                    }
                }
            }
        }))
    }

    /// Checks a request's credentials (a tonic interceptor).
    #[allow(clippy::result_large_err)]
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(file) = &self.0 else {
            return Ok(req);
        };
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        let Some(token) = token else {
            return Err(ServiceError::Unauthenticated(
                "missing `authorization: Bearer <api key>` metadata".into(),
            )
            .into());
        };
        // Every key is compared, none short-circuits.
        let accepted = file
            .read()
            .iter()
            .fold(false, |ok, k| ok | constant_time_eq(k, token.as_bytes()));
        if accepted {
            Ok(req)
        } else {
            Err(ServiceError::Unauthenticated("the API key is not valid".into()).into())
        }
    }
}

impl KeyFile {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Box<[u8]>>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_one_per_line_with_comments_on_their_own_lines() {
        let keys = parse_keys("# team a\n  k1  \n\n\t# team b\nk2\r\n").unwrap();
        assert_eq!(keys, ["k1", "k2"]);
    }

    #[test]
    fn a_file_without_keys_is_an_error_not_authentication_off() {
        for text in ["", "\n\n", "# only a comment\n   # another\n"] {
            let e = parse_keys(text).unwrap_err();
            assert!(
                e.contains("no key") && e.contains("allowed"),
                "{text:?}: {e}"
            );
        }
    }

    #[test]
    fn a_trailing_comment_or_inner_space_is_an_error_naming_the_line() {
        for (text, line) in [
            ("k1\nk2 # old key\n", "line 2"),
            ("a b\n", "line 1"),
            ("k#x", "line 1"),
        ] {
            let e = parse_keys(text).unwrap_err();
            assert!(e.contains(line) && e.contains("allowed"), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for v in ["Bearer k", "bearer k", "BEARER k", "  bearer   k  "] {
            assert_eq!(bearer_token(v), Some("k"), "{v:?}");
        }
        for v in ["Basic k", "Bearer", "Bearer   ", "Bearerk", "k"] {
            assert_eq!(bearer_token(v), None, "{v:?}");
        }
    }

    #[test]
    fn keys_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        for given in [&b"s3cre"[..], b"s3cret!", b"S3cret", b"", b"s3crets3cret"] {
            assert!(!constant_time_eq(b"s3cret", given), "{given:?}");
        }
        assert!(!constant_time_eq(b"", b""));
    }

    #[test]
    fn a_reload_picks_up_new_keys_and_keeps_the_old_ones_on_a_bad_file() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "old\n").unwrap();
        let keys = ApiKeys::from_file(f.path()).unwrap();
        let ok = |keys: &ApiKeys, k: &str| {
            let mut req = Request::new(());
            req.metadata_mut()
                .insert("authorization", format!("bearer {k}").parse().unwrap());
            keys.check(req).is_ok()
        };
        assert!(ok(&keys, "old") && !ok(&keys, "new"));
        assert_eq!(keys.reload(), Ok(false));
        std::fs::write(f.path(), "new\n").unwrap();
        assert_eq!(keys.reload(), Ok(true));
        assert!(!ok(&keys, "old") && ok(&keys, "new"));
        std::fs::write(f.path(), "# emptied by mistake\n").unwrap();
        assert!(keys.reload().unwrap_err().contains("no key"));
        assert!(ok(&keys, "new"), "a bad reload keeps the previous keys");
    }
}
