//! Accepted connections, at most a configured number open at once: past it, new ones wait in
//! the listen backlog until one closes, instead of each taking memory and file descriptors.
//! One address may hold only so many of them: past that, its new connections are closed at
//! once, so that one client cannot take every place.

use std::{
    collections::HashMap,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
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
    _address: Option<AddressSlot>,
}

impl Drop for LimitedConnection {
    fn drop(&mut self) {
        metrics::gauge!("stowage_connections_open").decrement(1.0);
    }
}

/// Open connections per address.
type Addresses = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// One of an address's places, given back when dropped.
struct AddressSlot {
    addresses: Addresses,
    ip: IpAddr,
}

/// The address a connection counts against: an IPv6 host usually holds a whole /64, so its
/// /64 is one address (an IPv4-mapped one is its IPv4 address).
fn counted_as(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from_bits(
                v6.to_bits() & !u128::from(u64::MAX),
            )),
        },
    }
}

impl AddressSlot {
    /// A place for `ip` if it holds fewer than `most`.
    fn take(addresses: &Addresses, ip: IpAddr, most: usize) -> Option<Self> {
        let ip = counted_as(ip);
        let mut open = addresses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = open.entry(ip).or_default();
        if *count >= most {
            return None;
        }
        *count += 1;
        Some(Self {
            addresses: Arc::clone(addresses),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self
            .addresses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Connections accepted from `listener`, at most `max` open at once and `per_address` (0:
/// no such bound) from one address.
pub fn limited(
    listener: TcpListener,
    max: usize,
    per_address: usize,
) -> impl Stream<Item = std::io::Result<LimitedConnection>> {
    let slots = Arc::new(Semaphore::new(max.max(1)));
    let addresses = Addresses::default();
    futures::stream::unfold(
        (listener, slots, addresses),
        move |(listener, slots, addresses)| async move {
            // The semaphore is never closed.
            let slot = Arc::clone(&slots).acquire_owned().await.ok()?;
            let accepted = loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let address = if per_address == 0 {
                            None
                        } else if let Some(held) =
                            AddressSlot::take(&addresses, peer.ip(), per_address)
                        {
                            Some(held)
                        } else {
                            tracing::debug!(address = %peer.ip(), per_address, "connection refused: its address holds too many");
                            metrics::counter!("stowage_connections_refused_total").increment(1);
                            drop(stream);
                            continue;
                        };
                        // Small gRPC messages go out at once.
                        let _ = stream.set_nodelay(true);
                        metrics::gauge!("stowage_connections_open").increment(1.0);
                        break Ok(LimitedConnection {
                            stream,
                            _slot: slot,
                            _address: address,
                        });
                    }
                    Err(error) => {
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        break Err(error);
                    }
                }
            };
            Some((accepted, (listener, slots, addresses)))
        },
    )
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
        let mut incoming = Box::pin(limited(listener, 2, 0));
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

    #[test]
    fn an_ipv6_host_counts_as_its_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(counted_as(a), counted_as(b));
        assert_ne!(counted_as(a), counted_as(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(counted_as(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(counted_as(v4), v4);
    }

    /// An address past its share has its new connections closed at once; another address is
    /// still taken, and a place given back is taken again.
    #[tokio::test]
    async fn one_address_holds_at_most_its_share() -> anyhow::Result<()> {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let mut incoming = Box::pin(limited(listener, 100, 2));
        let here = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let (_a, _b) = (
            TcpStream::connect(here).await?,
            TcpStream::connect(here).await?,
        );
        let first = incoming.next().await.transpose()?;
        let second = incoming.next().await.transpose()?;
        assert!(first.is_some() && second.is_some());
        // The third from 127.0.0.1 is closed by the server: it reads the end at once.
        let mut third = TcpStream::connect(here).await?;
        // Another address (127.0.0.2, loopback too, as the client's own) is still taken.
        let other = tokio::net::TcpSocket::new_v4()?;
        other.bind(std::net::SocketAddr::from(([127, 0, 0, 2], 0)))?;
        let _d = other.connect(here).await?;
        let taken = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await?;
        let taken = taken.transpose()?.expect("a connection");
        assert_eq!(
            taken.connect_info().remote_addr().map(|a| a.ip()),
            Some(std::net::IpAddr::from([127, 0, 0, 2]))
        );
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf)).await?;
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the third connection was kept: {read:?}"
        );
        // One of the first two closes: 127.0.0.1 has a place again.
        drop(first);
        let _e = TcpStream::connect(here).await?;
        let again = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await?;
        assert!(matches!(again, Some(Ok(_))));
        Ok(())
    }
}
