//! Who may do what: bearer tokens, each with scopes (`read`, `ingest`, `admin`) over
//! all views or a list of them, and TLS (with client certificates optional or required).
//!
//! A request names its token in the `authorization` header (`Bearer <token>`). With a
//! token file, a request without a valid token is `UNAUTHENTICATED` and one whose token
//! lacks the scope for its view is `PERMISSION_DENIED`; health checks need no token
//! (load balancers probe them). Tokens are compared in constant time, and every token
//! is compared, so the time taken says nothing of which one (or how much of one)
//! matched. Without a token file, every request may do everything.
//!
//! The token file (TOML):
//!
//! ```toml
//! [[tokens]]
//! name = "model-server"          # named in logs and errors, never the secret
//! token_env = "PANES_TOKEN_MODEL" # the secret, from the environment…
//! scopes = ["read"]
//! views = ["cards"]              # optional: all views when absent
//!
//! [[tokens]]
//! name = "producer"
//! token = "s3cr3t…"              # …or in the file itself
//! scopes = ["ingest", "read"]
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tonic::Status;

use crate::error::{PanesError, Result};

/// What a token allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Reads: `GetFeatures`, `DoGet`, `ListFeatures`, `DescribeView`.
    Read,
    /// Writes: `Ingest`, `DoPut`.
    Ingest,
    /// Everything, the metrics endpoint included.
    Admin,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Ingest => "ingest",
            Scope::Admin => "admin",
        }
    }
}

/// Shortest secret accepted: a token is a password that a network peer may guess at.
pub const MIN_TOKEN_LEN: usize = 16;

/// One token of the file.
struct Token {
    name: String,
    secret: Vec<u8>,
    scopes: Vec<Scope>,
    views: Option<Vec<String>>,
}

/// The tokens of a token file.
pub struct Tokens {
    tokens: Vec<Token>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.tokens.iter().map(|t| t.name.as_str()).collect();
        f.debug_struct("Tokens").field("names", &names).finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    tokens: Vec<RawToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    token: Option<String>,
    token_env: Option<String>,
    scopes: Vec<String>,
    views: Option<Vec<String>>,
}

impl Tokens {
    /// Reads a token file (see the module docs); `env` looks up `token_env` variables.
    ///
    /// # Errors
    /// An unreadable or malformed file, naming the token and field at fault: a token
    /// with neither or both of `token` and `token_env`, an unset variable, a secret
    /// shorter than [`MIN_TOKEN_LEN`] bytes, a secret given twice, an unknown scope.
    pub fn from_path(path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Tokens> {
        let origin = path.display().to_string();
        let text = crate::spec::read_text(path, 1 << 20, "a token file is a few KiB")
            .map_err(|e| PanesError::Invalid(format!("token file {origin}: {e}")))?;
        Self::parse(&text, &origin, env)
    }

    /// Parses a token file's text; `origin` names it in errors.
    ///
    /// # Errors
    /// As [`Tokens::from_path`].
    pub fn parse(text: &str, origin: &str, env: impl Fn(&str) -> Option<String>) -> Result<Tokens> {
        let bad = |m: String| PanesError::Invalid(format!("token file {origin}: {m}"));
        let raw: RawFile = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut tokens: Vec<Token> = Vec::with_capacity(raw.tokens.len());
        for (i, t) in raw.tokens.into_iter().enumerate() {
            let at = format!("token #{} ({:?})", i + 1, t.name);
            let secret = match (t.token, t.token_env) {
                (Some(s), None) => s,
                (None, Some(var)) => {
                    env(&var).ok_or_else(|| bad(format!("{at}: token_env {var:?} is not set")))?
                }
                _ => return Err(bad(format!("{at}: give one of token and token_env"))),
            };
            if secret.len() < MIN_TOKEN_LEN {
                return Err(bad(format!(
                    "{at}: the token has {} bytes; at least {MIN_TOKEN_LEN} are needed",
                    secret.len()
                )));
            }
            if tokens.iter().any(|o| o.secret == secret.as_bytes()) {
                return Err(bad(format!("{at}: the same token is given twice")));
            }
            let scopes = t
                .scopes
                .iter()
                .map(|s| match s.as_str() {
                    "read" => Ok(Scope::Read),
                    "ingest" => Ok(Scope::Ingest),
                    "admin" => Ok(Scope::Admin),
                    o => Err(bad(format!(
                        "{at}: unknown scope {o:?}; expected read, ingest or admin"
                    ))),
                })
                .collect::<Result<Vec<_>>>()?;
            tokens.push(Token {
                name: t.name,
                secret: secret.into_bytes(),
                scopes,
                views: t.views,
            });
        }
        if tokens.is_empty() {
            return Err(bad("no [[tokens]]: every request would be refused".into()));
        }
        Ok(Tokens { tokens })
    }

    /// The caller presenting `header` (an `authorization` header value), or
    /// `UNAUTHENTICATED`.
    pub(crate) fn authenticate(
        &self,
        header: Option<&[u8]>,
    ) -> std::result::Result<Caller, Status> {
        let Some(header) = header else {
            return Err(Status::unauthenticated(
                "no token: send `authorization: Bearer <token>`",
            ));
        };
        let Some(given) = header.strip_prefix(b"Bearer ") else {
            return Err(Status::unauthenticated(
                "the authorization header is not `Bearer <token>`",
            ));
        };
        // Every token is compared, each in constant time.
        let mut found = None;
        for (i, t) in self.tokens.iter().enumerate() {
            if constant_time_eq(&t.secret, given) {
                found = Some(i);
            }
        }
        let t = found
            .map(|i| &self.tokens[i])
            .ok_or_else(|| Status::unauthenticated("unknown token"))?;
        Ok(Caller(Some(Arc::new(Grant {
            name: t.name.clone(),
            scopes: t.scopes.clone(),
            views: t.views.clone(),
        }))))
    }
}

/// Whether `a == b`, in time that depends on their lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= (x ^ y) as u64;
    }
    std::hint::black_box(diff) == 0
}

#[derive(Debug)]
struct Grant {
    name: String,
    scopes: Vec<Scope>,
    views: Option<Vec<String>>,
}

/// Who sent a request: a token's grant, or anyone (no token file). Requests carry it
/// in their extensions (see [`Auth`]).
#[derive(Clone, Debug)]
pub(crate) struct Caller(Option<Arc<Grant>>);

impl Caller {
    /// Whether the caller may use `scope` on `view`.
    pub fn may(&self, scope: Scope, view: &str) -> bool {
        self.0.as_ref().is_none_or(|g| {
            let scoped = g.scopes.contains(&scope) || g.scopes.contains(&Scope::Admin);
            scoped && g.views.as_ref().is_none_or(|v| v.iter().any(|v| v == view))
        })
    }

    /// Whether the caller may do everything on every view (the metrics endpoint).
    pub fn is_admin(&self) -> bool {
        self.0
            .as_ref()
            .is_none_or(|g| g.scopes.contains(&Scope::Admin) && g.views.is_none())
    }

    /// `PERMISSION_DENIED` unless the caller may use `scope` on `view`.
    pub fn check(&self, scope: Scope, view: &str) -> std::result::Result<(), Status> {
        match &self.0 {
            Some(g) if !self.may(scope, view) => Err(Status::permission_denied(format!(
                "token {:?} may not {} view {view:?} (its scopes: {})",
                g.name,
                scope.name(),
                g.scopes
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            _ => Ok(()),
        }
    }

    /// The caller of a request, as [`Auth`] recorded it.
    pub fn of<T>(request: &tonic::Request<T>) -> std::result::Result<Caller, Status> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("the request was not authenticated"))
    }
}

/// The interceptor that authenticates every request of a service and records its
/// [`Caller`].
#[derive(Clone, Debug)]
pub(crate) struct Auth(pub Option<Arc<Tokens>>);

impl tonic::service::Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, Status> {
        let caller = match &self.0 {
            None => Caller(None),
            Some(tokens) => tokens.authenticate(
                request
                    .metadata()
                    .get("authorization")
                    .map(|v| v.as_bytes()),
            )?,
        };
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// Certificate and key files of the server, and the CA that client certificates must
/// chain to (required then: mutual TLS).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificates for client certificates; `None`: clients need none.
    pub client_ca: Option<PathBuf>,
}

/// The PEM file of `what` (a flag), read up to 1 MiB (`/dev/zero` must not grow
/// without bound).
fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    let bytes = crate::spec::read_text(path, 1 << 20, "a PEM file is a few KiB")
        .map_err(|e| PanesError::Invalid(format!("{what} {}: {e}", path.display())))?
        .into_bytes();
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(PanesError::Invalid(format!(
            "{what} {}: not a PEM file (no -----BEGIN line)",
            path.display()
        )));
    }
    Ok(bytes)
}

impl TlsFiles {
    /// Checks that the files hold a certificate chain, a key that belongs to it and
    /// CA certificates.
    ///
    /// # Errors
    /// Which file is missing, unreadable or wrong.
    pub fn check(&self) -> Result<()> {
        self.rustls().map(drop)
    }

    /// tonic's TLS configuration of the gRPC port.
    pub(crate) fn grpc(&self) -> Result<tonic::transport::ServerTlsConfig> {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let identity = Identity::from_pem(
            read_pem(&self.cert, "--tls-cert")?,
            read_pem(&self.key, "--tls-key")?,
        );
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read_pem(ca, "--tls-client-ca")?));
        }
        Ok(config)
    }

    /// How this instance connects to the others of its group (reads routed to the
    /// owner of a partition): trusting the client CA, else its own certificate, and
    /// presenting its certificate.
    pub(crate) fn peer_client(&self) -> Result<tonic::transport::ClientTlsConfig> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let cert = read_pem(&self.cert, "--tls-cert")?;
        let ca = match &self.client_ca {
            Some(ca) => read_pem(ca, "--tls-client-ca")?,
            None => cert.clone(),
        };
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, read_pem(&self.key, "--tls-key")?)))
    }

    /// The rustls configuration of the metrics port (the same certificate, the same
    /// client CA).
    pub(crate) fn rustls(&self) -> Result<Arc<tokio_rustls::rustls::ServerConfig>> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls;
        let invalid = |what: &str, path: &Path, e: &dyn fmt::Display| {
            PanesError::Invalid(format!("{what} {}: {e}", path.display()))
        };
        let certs = CertificateDer::pem_slice_iter(&read_pem(&self.cert, "--tls-cert")?)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| invalid("--tls-cert", &self.cert, &e))?;
        let key = PrivateKeyDer::from_pem_slice(&read_pem(&self.key, "--tls-key")?)
            .map_err(|e| invalid("--tls-key", &self.key, &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| PanesError::Internal(e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(&read_pem(ca, "--tls-client-ca")?) {
                    let c = c.map_err(|e| invalid("--tls-client-ca", ca, &e))?;
                    roots
                        .add(c)
                        .map_err(|e| invalid("--tls-client-ca", ca, &e))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.into(),
                    provider,
                )
                .build()
                .map_err(|e| invalid("--tls-client-ca", ca, &e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(|e| invalid("--tls-cert", &self.cert, &e))?;
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[tokens]]
name = "reader"
token = "read-token-0123456789"
scopes = ["read"]
views = ["cards"]

[[tokens]]
name = "producer"
token_env = "PRODUCER"
scopes = ["ingest", "read"]

[[tokens]]
name = "ops"
token = "admin-token-0123456789"
scopes = ["admin"]
"#;

    fn tokens() -> Tokens {
        Tokens::parse(FILE, "test", |v| {
            (v == "PRODUCER").then(|| "producer-token-0123456789".to_string())
        })
        .unwrap()
    }

    #[test]
    fn scopes_and_views_decide() {
        let t = tokens();
        let reader = t
            .authenticate(Some(b"Bearer read-token-0123456789"))
            .unwrap();
        assert!(reader.may(Scope::Read, "cards"));
        assert!(!reader.may(Scope::Read, "users"));
        let e = reader.check(Scope::Ingest, "cards").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message()
                .contains("token \"reader\" may not ingest view \"cards\""),
            "{}",
            e.message()
        );
        let producer = t
            .authenticate(Some(b"Bearer producer-token-0123456789"))
            .unwrap();
        assert!(producer.may(Scope::Ingest, "users") && producer.may(Scope::Read, "users"));
        assert!(!producer.may(Scope::Admin, "users"));
        let ops = t
            .authenticate(Some(b"Bearer admin-token-0123456789"))
            .unwrap();
        assert!(ops.may(Scope::Ingest, "x") && ops.may(Scope::Admin, "x"));
        assert!(Caller(None).may(Scope::Admin, "x"));
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_unauthenticated() {
        let t = tokens();
        for header in [
            None,
            Some(&b"read-token-0123456789"[..]),
            Some(b"Bearer read-token-012345678"),
            Some(b"Bearer read-token-01234567890"),
            Some(b"Bearer "),
        ] {
            let e = t.authenticate(header).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{header:?}");
        }
    }

    #[test]
    fn bad_token_files_say_what_is_wrong() {
        let cases = [
            (
                "[[tokens]]\nname = \"a\"\ntoken = \"short\"\nscopes = [\"read\"]",
                "at least 16",
            ),
            (
                "[[tokens]]\nname = \"a\"\nscopes = [\"read\"]",
                "give one of token and token_env",
            ),
            (
                "[[tokens]]\nname = \"a\"\ntoken_env = \"UNSET_VAR\"\nscopes = [\"read\"]",
                "\"UNSET_VAR\" is not set",
            ),
            (
                "[[tokens]]\nname = \"a\"\ntoken = \"0123456789abcdef\"\nscopes = [\"write\"]",
                "unknown scope \"write\"",
            ),
            (
                "[[tokens]]\nname = \"a\"\ntoken = \"0123456789abcdef\"\nscopes = []\n[[tokens]]\nname = \"b\"\ntoken = \"0123456789abcdef\"\nscopes = []",
                "given twice",
            ),
            ("tokens = []", "no [[tokens]]"),
        ];
        for (text, want) in cases {
            let e = Tokens::parse(text, "t.toml", |_| None)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains("t.toml"), "{text}: {e}");
        }
    }

    #[test]
    fn equal_compares_whole_values() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
