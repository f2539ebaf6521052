//! An HTTP/1.1 proxy that closes the connection after every response.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Forwards each request to the upstream server on a connection of its own and answers with
/// `Connection: close`, then closes: what simple WSGI servers, some proxies and load balancers
/// do. A client must take the complete response as the answer, whatever the connection does
/// next. Stopped when dropped.
pub struct ClosingProxy {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ClosingProxy {
    /// A proxy on a kernel-chosen loopback port in front of the server at `upstream`.
    pub fn start(upstream: SocketAddr) -> ClosingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let (served, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (served2, stop2) = (served.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let served = served2.clone();
                        std::thread::spawn(move || {
                            let _ = forward_one(client, upstream, &served);
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ClosingProxy { addr, served, stop, thread: Some(thread) }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Responses forwarded so far, each on a connection of its own. A response is counted
    /// before its first byte reaches the client, so a client holding its reply sees it counted.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for ClosingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One request in, one response out, then the connection is closed.
fn forward_one(mut client: TcpStream, upstream: SocketAddr, served: &AtomicUsize) -> io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (head, mut body) = read_head(&mut client)?;
    let length = content_length(&head);
    while body.len() < length {
        let mut buf = [0u8; 8192];
        let n = client.read(&mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&buf[..n]);
    }
    let mut server = TcpStream::connect(upstream)?;
    server.set_read_timeout(Some(Duration::from_secs(10)))?;
    server.write_all(&with_connection_close(&head))?;
    server.write_all(&body)?;
    // The upstream was asked to close after its response, so its end is the response's end.
    let mut response = Vec::new();
    server.read_to_end(&mut response)?;
    let split = find_head_end(&response).ok_or(io::ErrorKind::InvalidData)?;
    // Counted before the client can read it: counted after, a client could hold its reply and
    // read the count before this thread got to it (CI saw 14 of 15).
    served.fetch_add(1, Ordering::SeqCst);
    client.write_all(&with_connection_close(&response[..split]))?;
    client.write_all(&response[split..])?;
    client.flush()?;
    client.shutdown(Shutdown::Both)
}

/// The head up to and without its blank line, and whatever of the body came with it.
fn read_head(s: &mut TcpStream) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = find_head_end(&data) {
            let body = data.split_off(end);
            return Ok((data, body));
        }
        if data.len() > 64 * 1024 {
            return Err(io::ErrorKind::InvalidData.into());
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        data.extend_from_slice(&buf[..n]);
    }
}

/// Where the body starts: just past the head's `\r\n\r\n`.
fn find_head_end(data: &[u8]) -> Option<usize> {
    data.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn header_lines(head: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(head).unwrap_or("").split("\r\n").filter(|l| !l.is_empty())
}

fn content_length(head: &[u8]) -> usize {
    header_lines(head)
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `head` with its `Connection`/`Keep-Alive` headers replaced by `Connection: close`, and the
/// blank line that ends a head.
fn with_connection_close(head: &[u8]) -> Vec<u8> {
    let mut out = String::new();
    for line in header_lines(head) {
        let name = line.split_once(':').map(|(n, _)| n.trim()).unwrap_or("");
        if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}
