//! Many sockets' sends in one system call: a round of express writes ([`crate::express`]) goes
//! to the kernel as one io_uring submission per [`BATCH`] sockets instead of one `send` each.
//! The kernel's own part of a send stays; the system call around it (entry, file lookup,
//! `sendto`) is paid once per batch: ~9% less server CPU on a 1,000-subscriber fan-out
//! (docs/benchmarks.md, "Sends in batches").
//!
//! Every send is made with `MSG_DONTWAIT`: io_uring then completes it at submission (bytes sent,
//! or `-EAGAIN` for a socket that would block) instead of waiting for the socket, so a batch
//! never waits for a slow client. Each worker thread keeps its own small ring. Where io_uring is
//! not allowed (a container's seccomp profile, an old kernel), [`send_all`] says so once and the
//! caller sends one by one.

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::{opcode, types, IoUring};

/// Sockets per submission, and the ring's size. The fan-out holds their connections' locks for
/// the submission, so a publication for one of them meanwhile waits for it: 64 sockets per
/// submission saved two thirds of what 256 do (docs/benchmarks.md, "Sends in batches").
pub(crate) const BATCH: usize = 256;

/// What a send returns when io_uring failed after taking it: the bytes may or may not have gone
/// out, so the socket can only be closed (its client resumes from what it received).
pub(crate) const UNKNOWN: i32 = i32::MIN;

/// Set once io_uring was refused here: every later round sends one by one.
static UNAVAILABLE: AtomicBool = AtomicBool::new(false);

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// Sends each buffer on its socket without waiting, at most [`BATCH`] of them, and puts what
/// each send returned into `results`, in order: the bytes sent, a negative errno, or
/// [`UNKNOWN`]. False, with nothing sent, where io_uring is not available: the caller sends them
/// itself.
pub(crate) fn send_all(sends: &[(RawFd, &[u8])], results: &mut Vec<i32>) -> bool {
    assert!(sends.len() <= BATCH, "a batch is at most {BATCH} sends");
    if UNAVAILABLE.load(Ordering::Relaxed) {
        return false;
    }
    results.clear();
    if sends.is_empty() {
        return true;
    }
    RING.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.is_none() {
            match IoUring::new(BATCH as u32) {
                Ok(ring) => *slot = Some(ring),
                Err(e) => {
                    if !UNAVAILABLE.swap(true, Ordering::Relaxed) {
                        tracing::info!(error = %e, "io_uring not available: express writes send one socket at a time");
                    }
                    return false;
                }
            }
        }
        let ring = slot.as_mut().expect("made above");
        results.resize(sends.len(), UNKNOWN);
        let outcome = submit(ring, sends, results);
        if outcome != Outcome::Completed {
            // What the ring still holds must never run: it goes, and so does io_uring here.
            *slot = None;
            UNAVAILABLE.store(true, Ordering::Relaxed);
        }
        // Refused before the kernel took any: the caller sends them.
        outcome != Outcome::NotTaken
    })
}

/// How a submission ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Every send completed, with its result.
    Completed,
    /// io_uring failed before the kernel took any of the sends.
    NotTaken,
    /// io_uring failed after taking some: those without a completion are [`UNKNOWN`].
    Failed,
}

/// Submits the sends and takes every completion.
fn submit(ring: &mut IoUring, sends: &[(RawFd, &[u8])], results: &mut [i32]) -> Outcome {
    {
        let mut queue = ring.submission();
        for (i, (fd, bytes)) in sends.iter().enumerate() {
            let len = bytes.len().min(u32::MAX as usize) as u32;
            let send = opcode::Send::new(types::Fd(*fd), bytes.as_ptr(), len)
                .flags(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
                .build()
                .user_data(i as u64);
            // SAFETY: the kernel reads `bytes` only until the send completes, and this function
            // returns (ending the borrow) only once every send the kernel took has completed
            // (`MSG_DONTWAIT` sends complete while they are submitted); should io_uring fail,
            // those it did not take never run, as the ring is then dropped. The queue has room:
            // it is `BATCH` long and emptied by every call.
            unsafe { queue.push(&send) }.expect("a batch fits the ring");
        }
    }
    let mut done = 0;
    while done < sends.len() {
        match ring.submit_and_wait(sends.len() - done) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!(error = %e, "io_uring failed: express writes send one socket at a time");
                // io_uring_enter fails only before it consumed anything in that call.
                if done == 0 && ring.submission().len() == sends.len() {
                    return Outcome::NotTaken;
                }
                take_completions(ring, results, &mut done);
                return Outcome::Failed;
            }
        }
        take_completions(ring, results, &mut done);
    }
    Outcome::Completed
}

fn take_completions(ring: &mut IoUring, results: &mut [i32], done: &mut usize) {
    for completion in ring.completion() {
        results[completion.user_data() as usize] = completion.result();
        *done += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (server, client)
    }

    /// Each socket gets exactly its own bytes; a socket that would block says so (and is sent
    /// nothing), without holding up the others.
    #[test]
    fn each_socket_gets_its_bytes_and_a_full_one_would_block() {
        let (a, mut a_peer) = pair();
        let (b, mut b_peer) = pair();
        let (full, _full_peer) = pair();
        socket2::SockRef::from(&full)
            .set_send_buffer_size(4096)
            .unwrap();
        // Fill `full` until a plain send would block.
        let chunk = [7u8; 4096];
        while (&full).write(&chunk).is_ok() {}

        let sends: Vec<(RawFd, &[u8])> = vec![
            (a.as_raw_fd(), b"first socket"),
            (full.as_raw_fd(), b"no room"),
            (b.as_raw_fd(), b"second"),
        ];
        let mut results = Vec::new();
        if !send_all(&sends, &mut results) {
            // No io_uring here: nothing may have been sent.
            assert!(UNAVAILABLE.load(Ordering::Relaxed));
            a.set_nonblocking(true).unwrap();
            a_peer.set_nonblocking(true).unwrap();
            assert!(a_peer.read(&mut [0; 16]).is_err(), "sent without io_uring");
            return;
        }
        assert_eq!(results, vec![12, -libc::EAGAIN, 6]);
        let mut got = [0; 12];
        a_peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"first socket");
        let mut got = [0; 6];
        b_peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"second");
    }
}
