//! The client side's sockets and the processes it measures: source addresses beyond one IP's
//! ephemeral ports, the open-file limit, and a process's memory and CPU from /proc.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpSocket, TcpStream};

/// Connections per source address: the ephemeral port range (32768–60999) gives ~28k per
/// (source IP, destination) pair, so stay under it.
const PER_SOURCE: usize = 25_000;

/// Runs with fewer connections than this use 127.0.0.1 without binding.
const SMALL: usize = 2_000;
/// Loopback addresses handed to large runs: 127.0.0.2 … 127.0.0.251.
const POOL: usize = 250;

/// Where the next large run's addresses start. Each run takes fresh ones: the previous run's
/// closed connections keep their ports in TIME_WAIT for a minute, and a run on the same addresses
/// would find the port range used up.
static NEXT_ADDRESS: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Loopback source addresses handed out round-robin, as many as the connection count needs.
pub struct Sources {
    addrs: Vec<IpAddr>,
    next: AtomicUsize,
}

impl Sources {
    pub fn for_connections(n: usize) -> Sources {
        let addrs = if n < SMALL {
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
        } else {
            let count = n.div_ceil(PER_SOURCE).clamp(1, POOL);
            // Processes started one after the other begin at different places too.
            let _ = NEXT_ADDRESS.compare_exchange(
                usize::MAX,
                std::process::id() as usize % POOL,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            let start = NEXT_ADDRESS.fetch_add(count, Ordering::Relaxed);
            (0..count)
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + ((start + i) % POOL) as u8)))
                .collect()
        };
        Sources {
            addrs,
            next: AtomicUsize::new(0),
        }
    }

    pub fn pick(&self) -> IpAddr {
        self.addrs[self.next.fetch_add(1, Ordering::Relaxed) % self.addrs.len()]
    }

    pub fn all(&self) -> &[IpAddr] {
        &self.addrs
    }
}

/// A TCP connection from `source` (any port) to `dest`, with Nagle off.
pub async fn connect(dest: SocketAddr, source: IpAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if source != IpAddr::V4(Ipv4Addr::LOCALHOST) {
        // Pick the port at connect time, per destination, instead of at bind time: bind(port 0)
        // would search for a port unused by every socket of the address, slow at tens of
        // thousands of connections and limited to one range per source address.
        let on: libc::c_int = 1;
        // SAFETY: setsockopt on our own socket with a pointer to a live c_int of the given size.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &on as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        socket.bind(SocketAddr::new(source, 0))?;
    }
    // Closed with a reset, not a FIN: the generator closes first, and every closed connection
    // would otherwise keep its port in TIME_WAIT for a minute, so a run right after a large one
    // (the suite's peers after the gateway's 19,000 connections) found no ports left.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on our own socket with a pointer to a live linger of the given size.
    // (tokio's `set_linger` is deprecated because a nonzero linger blocks the dropping thread;
    // zero never waits.)
    let set = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let stream = socket.connect(dest).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// `host:port` of an `http://` or `ws://` origin, resolved for loopback use.
pub fn socket_addr(origin: &str) -> Result<SocketAddr, String> {
    let rest = origin.split_once("://").map(|(_, r)| r).unwrap_or(origin);
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.replace("localhost", "127.0.0.1");
    authority
        .parse()
        .map_err(|e| format!("{origin}: not an ip:port origin ({e})"))
}

/// Raises this process's open-file limit (soft and, as root, hard) to at least `want`; children
/// started afterwards (gateways, peers) inherit it. Returns the soft limit in force.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        let want = want as libc::rlim_t;
        if lim.rlim_cur < want {
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: lim.rlim_max.max(want),
            };
            let capped = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            } else if libc::setrlimit(libc::RLIMIT_NOFILE, &capped) == 0 {
                // Not privileged: the hard limit is as far as we may go.
                lim = capped;
            }
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
    let soft = lim.rlim_cur as u64;
    soft
}

/// Resident memory of a process in bytes, from /proc/PID/status.
pub fn vm_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time (user + system) a process has used, in seconds, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: fields start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks.max(1.0))
}

/// CPU seconds summed over several processes (those that exited count as 0).
pub fn cpu_seconds_all(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| cpu_seconds(*p)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_cover_the_count_and_move_on_between_runs() {
        let small = Sources::for_connections(10);
        assert_eq!(small.all(), [IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        let a = Sources::for_connections(100_000);
        assert_eq!(a.all().len(), 4);
        assert_eq!(a.pick(), a.all()[0]);
        assert_eq!(a.pick(), a.all()[1]);
        let b = Sources::for_connections(30_000);
        assert_eq!(b.all().len(), 2);
        for addr in b.all() {
            assert!(!a.all().contains(addr), "a new run gets fresh addresses");
            assert_ne!(*addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
    }

    #[test]
    fn origins_to_socket_addrs() {
        assert_eq!(
            socket_addr("ws://127.0.0.1:8080/ws").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            socket_addr("http://localhost:1").unwrap(),
            "127.0.0.1:1".parse().unwrap()
        );
        assert!(socket_addr("http://example.com:1").is_err());
    }

    #[test]
    fn this_process_has_memory_and_cpu() {
        let pid = std::process::id();
        assert!(vm_rss(pid).unwrap() > 0);
        assert!(cpu_seconds(pid).is_some());
    }
}
