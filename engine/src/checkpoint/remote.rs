//! Checkpoint locations in object stores (S3, GCS, Azure) through the `object_store`
//! crate (feature `cloud`).
//!
//! The store's client is async; checkpoints are written from plain threads (the Kafka
//! consumer, the server's write workers). Each call runs on one small runtime of its
//! own and the caller waits for it, so a call from inside another runtime neither
//! blocks that runtime's reactor nor needs one.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ObjectStore, ObjectStoreExt as _, PutMode, PutOptions, PutPayload, RetryConfig,
};

use crate::error::{PanesError, Result};

/// Requests are retried with exponential backoff (100 ms doubling to 5 s) for up to
/// this long, then the operation fails (and a checkpoint failure is counted and logged).
const RETRY_FOR: Duration = Duration::from_secs(60);

/// A prefix in an object store.
#[derive(Clone)]
pub(crate) struct Remote {
    store: Arc<dyn ObjectStore>,
    /// `scheme://bucket`, for messages.
    base: String,
    prefix: Path,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url(""))
    }
}

/// The runtime every object-store call runs on.
fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> =
        OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("panes-object-store")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| PanesError::Internal(format!("object-store runtime: {e}")))
}

/// Runs `f` on the object-store runtime and waits for it.
fn block<T: Send + 'static>(
    f: impl Future<Output = object_store::Result<T>> + Send + 'static,
) -> std::result::Result<T, String> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().map_err(|e| e.to_string())?.spawn(async move {
        let _ = tx.send(f.await);
    });
    match rx.recv() {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the object-store call stopped without an answer".into()),
    }
}

impl Remote {
    /// The store of `url` (`scheme://rest`), configured from the environment.
    pub(crate) fn parse(scheme: &str, rest: &str, url: &str) -> Result<Self> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(PanesError::Invalid(format!(
                "checkpoint URL {url:?}: no bucket (expected {scheme}://BUCKET/PREFIX)"
            )));
        }
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: 10,
            retry_timeout: RETRY_FOR,
        };
        let store_url = format!("{scheme}://{bucket}");
        let built: object_store::Result<Arc<dyn ObjectStore>> = match scheme {
            "s3" => AmazonS3Builder::from_env()
                .with_url(&store_url)
                .with_retry(retry)
                .build()
                .map(|s| Arc::new(s) as _),
            "gs" => GoogleCloudStorageBuilder::from_env()
                .with_url(&store_url)
                .with_retry(retry)
                .build()
                .map(|s| Arc::new(s) as _),
            _ => MicrosoftAzureBuilder::from_env()
                .with_url(&store_url)
                .with_retry(retry)
                .build()
                .map(|s| Arc::new(s) as _),
        };
        let store = built.map_err(|e| {
            PanesError::Invalid(format!(
                "checkpoint URL {url:?}: the store cannot be configured from the environment: {e}"
            ))
        })?;
        Ok(Remote {
            store,
            base: store_url,
            prefix: Path::from(prefix),
        })
    }

    /// The location `name` inside this one.
    pub(crate) fn join(&self, name: &str) -> Self {
        Remote {
            prefix: self.prefix.clone().join(name),
            ..self.clone()
        }
    }

    fn path(&self, name: &str) -> Path {
        self.prefix.clone().join(name)
    }

    /// The URL of object `name` (of the location itself when `name` is empty).
    pub(crate) fn url(&self, name: &str) -> String {
        let p = if name.is_empty() {
            self.prefix.clone()
        } else {
            self.path(name)
        };
        format!("{}/{p}", self.base)
    }

    fn fail(&self, name: &str, e: String) -> PanesError {
        PanesError::file(self.url(name), e)
    }

    pub(crate) fn names(&self) -> Result<Vec<String>> {
        let (store, prefix) = (self.store.clone(), self.prefix.clone());
        let listed = block(async move { store.list_with_delimiter(Some(&prefix)).await })
            .map_err(|e| self.fail("", e))?;
        Ok(listed
            .objects
            .into_iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .collect())
    }

    pub(crate) fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let (store, path) = (self.store.clone(), self.path(name));
        let got = block(async move {
            match store.get(&path).await {
                Ok(r) => r.bytes().await.map(|b| Some(b.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        got.map_err(|e| self.fail(name, e))
    }

    /// Writes object `name` whole (one PUT: readers see the old object or the new
    /// one); with `create`, only if it does not exist: `Ok(false)` when it did.
    pub(crate) fn put(&self, name: &str, bytes: &[u8], create: bool) -> Result<bool> {
        let (store, path) = (self.store.clone(), self.path(name));
        let payload = PutPayload::from(bytes.to_vec());
        let mode = if create {
            PutMode::Create
        } else {
            PutMode::Overwrite
        };
        let put = block(async move {
            match store.put_opts(&path, payload, PutOptions::from(mode)).await {
                Ok(_) => Ok(true),
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) if create => Ok(false),
                Err(e) => Err(e),
            }
        });
        put.map_err(|e| self.fail(name, e))
    }

    pub(crate) fn remove(&self, name: &str) -> Result<()> {
        let (store, path) = (self.store.clone(), self.path(name));
        block(async move {
            match store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
        .map_err(|e| self.fail(name, e))
    }
}
