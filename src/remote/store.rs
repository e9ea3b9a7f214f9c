//! The object store behind a remote checkpoint, and the small tokio runtime
//! that drives it.
//!
//! `object_store` is async; ckptfs's readers are called from plain threads
//! (FUSE workers, the loader). The [`Store`] owns a two-thread runtime and
//! every call into it goes through [`Store::run`] with a deadline, so a
//! thread never waits on the network without a bound.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig, path::Path as ObjPath,
};

use super::RemoteError;
use super::url::S3Url;

/// Longest a single request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// An object store, a bucket/prefix in it, and the runtime its calls run on.
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    url: S3Url,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish()
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, RemoteError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ckptfs-s3")
        .enable_all()
        .build()
        .map_err(|source| RemoteError::Runtime { source })
}

impl Store {
    /// The S3 store of `url`, configured as every S3 tool is: endpoint from
    /// `AWS_ENDPOINT_URL`, credentials from `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`, region from `AWS_REGION` (default
    /// us-east-1); path-style addressing (what local stores such as
    /// SeaweedFS and MinIO serve), plain HTTP only for an `http://` endpoint.
    ///
    /// Credentials must be given (or `AWS_SKIP_SIGNATURE=true` for a public
    /// bucket): without them the client would ask a cloud instance-metadata
    /// service, which is not there off the cloud and never a store's answer.
    pub fn from_env(url: &S3Url) -> Result<Store, RemoteError> {
        let var = |k| std::env::var(k).unwrap_or_default();
        let anonymous = matches!(var("AWS_SKIP_SIGNATURE").as_str(), "true" | "1");
        if !anonymous
            && (var("AWS_ACCESS_KEY_ID").is_empty() || var("AWS_SECRET_ACCESS_KEY").is_empty())
        {
            return Err(RemoteError::NoCredentials {
                url: url.to_string(),
            });
        }
        let endpoint = var("AWS_ENDPOINT_URL");
        // The client retries transient failures itself, briefly: a demand
        // read must fail fast enough to answer the VM (see `reader`).
        let retry = RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(3),
            ..RetryConfig::default()
        };
        let client = ClientOptions::new()
            .with_allow_http(endpoint.starts_with("http://"))
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(Duration::from_secs(2))
            .with_pool_max_idle_per_host(64);
        let s3 = AmazonS3Builder::from_env()
            .with_bucket_name(&url.bucket)
            .with_virtual_hosted_style_request(false)
            .with_client_options(client)
            .with_retry(retry)
            .build()
            .map_err(|source| RemoteError::Config {
                url: url.to_string(),
                source,
            })?;
        Self::with_store(Arc::new(s3), url.clone())
    }

    /// `store` (e.g. `object_store::memory::InMemory` in tests) at `url`.
    pub fn with_store(store: Arc<dyn ObjectStore>, url: S3Url) -> Result<Store, RemoteError> {
        Ok(Store {
            inner: store,
            url,
            rt: runtime()?,
        })
    }

    /// The location this store serves.
    pub fn url(&self) -> &S3Url {
        &self.url
    }

    /// The object store.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// Run `f` on the store's runtime and wait for it at most `limit`.
    pub fn run<F>(&self, limit: Duration, f: F) -> Option<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt
            .block_on(async move { tokio::time::timeout(limit, f).await.ok() })
    }

    /// The runtime's handle, to spawn tasks on.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.rt.handle()
    }

    /// The whole object at `key` (a bucket key), at most `max` bytes.
    pub fn get_all(&self, key: &str, max: u64) -> Result<bytes::Bytes, RemoteError> {
        let store = self.inner.clone();
        let path = ObjPath::from(key);
        let obj = self.object(key);
        let fut = async move {
            let meta = store.head(&path).await?;
            if meta.size > max {
                return Ok(Err(meta.size));
            }
            let got = store.get_range(&path, 0..meta.size).await?;
            Ok(Ok(got))
        };
        match self.run(REQUEST_TIMEOUT * 3, fut) {
            None => Err(RemoteError::Timeout { object: obj }),
            Some(Err(source)) => Err(RemoteError::from_store(obj, source)),
            Some(Ok(Err(size))) => Err(RemoteError::TooLarge {
                object: obj,
                size,
                max,
            }),
            Some(Ok(Ok(b))) => Ok(b),
        }
    }

    /// `s3://bucket/key`, as errors name an object.
    pub fn object(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.url.bucket)
    }
}
