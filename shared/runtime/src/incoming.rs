//! Accepted connections, at most a configured number open at once: past it, new ones wait in
//! the listen backlog until one closes, instead of each taking memory and file descriptors.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long accepting pauses after an error (out of file descriptors, say), so the server
/// does not spin on it.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// An accepted connection holding its place among the open ones until it is dropped.
pub struct LimitedConnection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Drop for LimitedConnection {
    fn drop(&mut self) {
        metrics::gauge!("stowage_connections_open").decrement(1.0);
    }
}

/// Connections accepted from `listener`, at most `max` open at once.
pub fn limited(
    listener: TcpListener,
    max: usize,
) -> impl Stream<Item = std::io::Result<LimitedConnection>> {
    let slots = Arc::new(Semaphore::new(max.max(1)));
    futures::stream::unfold((listener, slots), |(listener, slots)| async move {
        // The semaphore is never closed.
        let slot = Arc::clone(&slots).acquire_owned().await.ok()?;
        let accepted = match listener.accept().await {
            Ok((stream, _)) => {
                // Small gRPC messages go out at once.
                let _ = stream.set_nodelay(true);
                metrics::gauge!("stowage_connections_open").increment(1.0);
                Ok(LimitedConnection {
                    stream,
                    _slot: slot,
                })
            }
            Err(error) => {
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                Err(error)
            }
        };
        Some((accepted, (listener, slots)))
    })
}

impl Connected for LimitedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn past_the_limit_a_connection_waits_until_one_closes() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut incoming = Box::pin(limited(listener, 2));
        let _a = TcpStream::connect(addr).await?;
        let _b = TcpStream::connect(addr).await?;
        let _c = TcpStream::connect(addr).await?;
        let first = incoming.next().await.transpose()?;
        let second = incoming.next().await.transpose()?;
        assert!(first.is_some() && second.is_some());
        // The third is connected (in the backlog) but not accepted while two are open.
        let waiting = tokio::time::timeout(Duration::from_millis(300), incoming.next()).await;
        assert!(waiting.is_err(), "a third connection was accepted");
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await?;
        assert!(matches!(third, Some(Ok(_))));
        Ok(())
    }
}
