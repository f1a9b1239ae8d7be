//! Free loopback ports that are bindable for both TCP and UDP and never handed out twice.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// Ports handed out by this process so far.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Lowest port of the random search range.
const RANGE_LOW: u16 = 10_000;

fn handed_out() -> MutexGuard<'static, Option<HashSet<u16>>> {
    HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether `127.0.0.1:port` can be bound right now for both TCP and UDP.
pub fn port_is_free(port: u16) -> bool {
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    TcpListener::bind(addr).is_ok() && UdpSocket::bind(addr).is_ok()
}

/// First port of the kernel's ephemeral (outgoing connection) range, 32768 if unknown.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

fn random_u64(salt: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    std::collections::hash_map::RandomState::new().hash_one((nanos, salt, std::process::id()))
}

/// Returns a port on 127.0.0.1 that is free for both TCP and UDP and that this
/// process has not handed out before.
///
/// Ports are picked at random **below** the kernel's ephemeral port range
/// (`/proc/sys/net/ipv4/ip_local_port_range`, usually from 10000 to 32767), so
/// the kernel never assigns them to outgoing connections. That keeps a killed
/// agent's ports free for [`crate::Agent::restart`]. If that range is unusable,
/// it falls back to binding `127.0.0.1:0` and taking the port the kernel picks.
///
/// A port can still be taken by another process between this check and the
/// agent's bind; [`crate::Agent::start`] retries with new ports in that case.
pub fn free_port() -> io::Result<u16> {
    let mut guard = handed_out();
    let used = guard.get_or_insert_with(HashSet::new);

    let high = ephemeral_low();
    if high > RANGE_LOW + 1_000 {
        let span = u64::from(high - RANGE_LOW);
        for attempt in 0..512u64 {
            let offset = u16::try_from(random_u64(attempt) % span).unwrap_or(0);
            let port = RANGE_LOW + offset;
            if !used.contains(&port) && port_is_free(port) {
                used.insert(port);
                return Ok(port);
            }
        }
    }

    for _ in 0..256 {
        let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        drop(listener);
        if !used.contains(&port) && port_is_free(port) {
            used.insert(port);
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        "serf-testkit: found no free 127.0.0.1 port (TCP and UDP) after 768 tries",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_unique_and_free() {
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let p = free_port().unwrap();
            assert!(seen.insert(p), "port {p} handed out twice");
            assert!(port_is_free(p));
        }
    }

    #[test]
    fn busy_port_is_not_free() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!port_is_free(l.local_addr().unwrap().port()));
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(!port_is_free(u.local_addr().unwrap().port()));
    }
}
