//! The S3-compatible file store (`tasks.s3`, the `object_store` crate): objects
//! `PREFIX/DEVELOPER/FILE_ID` in one bucket, on AWS S3 or any S3-compatible server (MinIO,
//! Ceph, R2, …; path-style requests unless told otherwise).
//!
//! Uploads are spooled to a local temporary file first (hashed, counted and bounded as they
//! arrive, whatever the client's pace), then sent on commit: one `PUT` up to 8 MiB, a
//! multipart upload above (8 MiB parts, 4 in flight), so a half-sent object is never visible.
//! Reads stream the object's body. Credentials come from environment variables named in the
//! configuration, never from the YAML.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::io::AsyncReadExt;

use crate::config::S3Config;
use crate::files::{check_name, FileError, FileStore, Reader, Target, Upload, Writer};

/// Parts of a multipart upload, and the size up to which one `PUT` is used instead.
const PART_BYTES: usize = 8 * 1024 * 1024;

/// Objects in an S3-compatible bucket.
pub struct S3Files {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    spool: PathBuf,
}

fn remote(e: object_store::Error) -> FileError {
    match e {
        object_store::Error::NotFound { .. } => FileError::NotFound,
        e => FileError::Remote(e.to_string()),
    }
}

impl S3Files {
    /// A store on `config`'s bucket, spooling uploads in `spool`. The credentials are read
    /// from the environment now.
    pub fn new(config: &S3Config, spool: PathBuf) -> Result<S3Files, FileError> {
        let env = |name: &str| {
            std::env::var(name).map_err(|_| {
                FileError::Remote(format!("environment variable {name} (tasks.s3) is not set"))
            })
        };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(env(&config.access_key_id_env)?)
            .with_secret_access_key(env(&config.secret_access_key_env)?)
            .with_allow_http(config.allow_http)
            .with_virtual_hosted_style_request(config.virtual_hosted_style);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let store = builder.build().map_err(remote)?;
        crate::files::create_dir(&spool)?;
        Ok(S3Files {
            store: Arc::new(store),
            prefix: config.prefix.trim_matches('/').to_owned(),
            spool,
        })
    }

    fn path(&self, name: &str) -> Result<ObjectPath, FileError> {
        let (dir, file) = check_name(name)?;
        let full = if self.prefix.is_empty() {
            format!("{dir}/{file}")
        } else {
            format!("{}/{dir}/{file}", self.prefix)
        };
        ObjectPath::parse(full).map_err(|_| FileError::Name)
    }
}

/// Where a spooled object goes on commit.
struct Destination {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
}

#[async_trait]
impl Upload for Destination {
    /// Every failure is `Remote` (a missing bucket is not a missing file).
    async fn upload(&self, tmp: &Path, bytes: u64) -> Result<(), FileError> {
        let remote = |e: object_store::Error| FileError::Remote(e.to_string());
        let mut file = tokio::fs::File::open(tmp).await?;
        if bytes as usize <= PART_BYTES {
            let mut buf = Vec::with_capacity(bytes as usize);
            file.read_to_end(&mut buf).await?;
            self.store
                .put(&self.path, PutPayload::from(buf))
                .await
                .map_err(remote)?;
            return Ok(());
        }
        let upload = self.store.put_multipart(&self.path).await.map_err(remote)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buf = vec![0u8; 1024 * 1024];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            writer.wait_for_capacity(4).await.map_err(remote)?;
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(remote)?;
        Ok(())
    }
}

#[async_trait]
impl FileStore for S3Files {
    async fn create(&self, name: &str, limit: u64) -> Result<Writer, FileError> {
        let path = self.path(name)?;
        let dest = Destination {
            store: Arc::clone(&self.store),
            path,
        };
        let (_, file) = check_name(name)?;
        Writer::spool(&self.spool, file, Target::Remote(Box::new(dest)), limit).await
    }

    async fn open(&self, name: &str) -> Result<Reader, FileError> {
        let got = self.store.get(&self.path(name)?).await.map_err(remote)?;
        let stream = got
            .into_stream()
            .map_err(|e| std::io::Error::other(e.to_string()));
        Ok(Box::pin(tokio_util::io::StreamReader::new(stream)))
    }

    async fn remove(&self, name: &str) -> Result<(), FileError> {
        match self.store.delete(&self.path(name)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(remote(e)),
        }
    }
}
