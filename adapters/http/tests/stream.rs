//! `HttpClient::stream`: a response body read as it arrives, against a real socket server that
//! sends its second chunk only once the client has reported the first.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use leasehold_http::HttpClient;

mod support;
use support::within;

#[test]
fn a_streamed_body_is_read_chunk_by_chunk_as_the_server_sends_it() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (got_first, first_seen) = mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (socket, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(socket.try_clone().unwrap());
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let mut w = socket;
        w.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n").unwrap();
        // The rest only once the client has the first piece: a client that waited for the whole
        // body would never get here.
        first_seen.recv_timeout(Duration::from_secs(10)).expect("the client read the first chunk");
        w.write_all(b"6\r\nsecond\r\n0\r\n\r\n").unwrap();
        body
    });
    let client = HttpClient::new(&url, Duration::from_secs(5)).unwrap();
    smol::block_on(within(10_000, "the stream", async {
        let req = client.request(hyper::Method::POST, "/watch").body(Full::new(Bytes::from("{}"))).unwrap();
        let mut stream = client.stream(req).await.unwrap();
        assert_eq!(stream.status, 200);
        assert_eq!(stream.next_chunk().await.unwrap().unwrap(), "first");
        got_first.send(()).unwrap();
        assert_eq!(stream.next_chunk().await.unwrap().unwrap(), "second");
        assert!(stream.next_chunk().await.is_none(), "the body's end");
    }));
    assert_eq!(server.join().unwrap(), b"{}", "the request body reached the server");
}
