//! Reading one PROXY header from an async byte stream (feature `io`): the loop both servers
//! run over [`super::parse`], reading exactly what the header needs, never a byte of what
//! follows, so the stream goes on to TLS or HTTP untouched.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::{parse, Parsed, ProxyError, V1_MAX_LEN};

/// Why no header could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("PROXY header: {0}")]
    Invalid(#[from] ProxyError),
    #[error("PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one header; the source address it names, canonical (`None`: `LOCAL`/`UNKNOWN`, keep
/// the peer). The caller bounds the time it may take.
pub async fn read<S>(stream: &mut S) -> Result<Option<SocketAddr>, ReadError>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let mut buf = Vec::with_capacity(V1_MAX_LEN);
    loop {
        match parse(&buf)? {
            Parsed::Complete { source, .. } => {
                return Ok(source.map(|s| SocketAddr::new(s.ip().to_canonical(), s.port())));
            }
            Parsed::Incomplete { needed } => {
                let start = buf.len();
                buf.resize(start + needed.max(1), 0);
                stream.read_exact(&mut buf[start..]).await?;
            }
        }
    }
}
