use super::*;
use http_body_util::BodyExt;
use proptest::prelude::*;

/// A stream that hands out `pieces` one read at a time, then ends.
struct Pieces(std::collections::VecDeque<Vec<u8>>);

impl Pieces {
    fn new(pieces: &[&[u8]]) -> Pieces {
        Pieces(pieces.iter().map(|p| p.to_vec()).collect())
    }

    fn split(bytes: &[u8], cuts: &[usize]) -> Pieces {
        let mut out = std::collections::VecDeque::new();
        let mut at = 0;
        for &cut in cuts {
            let cut = cut.min(bytes.len());
            if cut > at {
                out.push_back(bytes[at..cut].to_vec());
                at = cut;
            }
        }
        out.push_back(bytes[at..].to_vec());
        Pieces(out)
    }
}

impl AsyncRead for Pieces {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(mut piece) = self.0.pop_front() {
            let n = piece.len().min(buf.remaining());
            buf.put_slice(&piece[..n]);
            if n < piece.len() {
                self.0.push_front(piece.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

async fn head_of(pieces: &[&[u8]]) -> io::Result<(Head, BytesMut)> {
    let mut stream = Pieces::new(pieces);
    let mut buf = BytesMut::new();
    let head = read_head(&mut stream, &mut buf).await?;
    Ok((head, buf))
}

async fn body_of(answer: &[u8], cuts: &[usize]) -> io::Result<Vec<u8>> {
    let mut stream = Pieces::split(answer, cuts);
    let mut buf = BytesMut::new();
    let head = read_head(&mut stream, &mut buf).await?;
    let body = RefusalBody::new(&head, stream, buf)?;
    Ok(body.collect().await?.to_bytes().to_vec())
}

#[tokio::test]
async fn a_101_split_across_reads_keeps_what_follows_it() -> io::Result<()> {
    let (head, rest) = head_of(&[
        b"HTTP/1.1 101 Switching Protocols\r\nUpg",
        b"rade: websocket\r\nConnection: Upgrade\r\nX-Empty:\r\n",
        b"\r\n\x81\x02hi",
    ])
    .await?;
    assert_eq!(head.status, StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(head.headers["upgrade"], "websocket");
    assert_eq!(head.headers["x-empty"], "");
    assert_eq!(&rest[..], b"\x81\x02hi");
    Ok(())
}

#[tokio::test]
async fn informational_answers_before_the_final_one_are_skipped() -> io::Result<()> {
    let (head, rest) = head_of(&[
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno",
    ])
    .await?;
    assert_eq!(head.status, StatusCode::FORBIDDEN);
    assert_eq!(&rest[..], b"no");
    Ok(())
}

#[tokio::test]
async fn bad_or_endless_heads_are_errors() {
    for answer in [
        &b"HTTP/1.1 abc Nope\r\n\r\n"[..],
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 101 OK\r\nBad Header: x\r\n\r\n",
    ] {
        assert!(head_of(&[answer]).await.is_err(), "{answer:?}");
    }
    let endless = format!("HTTP/1.1 101 OK\r\nX: {}", "a".repeat(MAX_HEAD));
    let err = head_of(&[endless.as_bytes()]).await.err();
    assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::InvalidData));
    let err = head_of(&[b"HTTP/1.1 101 OK\r\n"]).await.err();
    assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::UnexpectedEof));
}

#[tokio::test]
async fn refusal_bodies_end_by_length_chunks_or_close() -> io::Result<()> {
    let sized = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nhello trailing junk";
    assert_eq!(body_of(sized, &[30, 40]).await?, b"hello");
    let chunked = b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nbusy\r\n7\r\n, later\r\n0\r\nX-Trailer: t\r\n\r\n";
    assert_eq!(body_of(chunked, &[50, 53, 60]).await?, b"busy, later");
    let close = b"HTTP/1.0 400 Bad\r\n\r\nuntil the end";
    assert_eq!(body_of(close, &[21]).await?, b"until the end");
    let empty = b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n";
    assert_eq!(body_of(empty, &[]).await?, b"");
    Ok(())
}

#[tokio::test]
async fn broken_refusal_bodies_are_errors() {
    for answer in [
        &b"HTTP/1.1 403 F\r\nContent-Length: 10\r\n\r\nshort"[..],
        b"HTTP/1.1 403 F\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 403 F\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 403 F\r\nContent-Length: +1\r\n\r\nx",
        b"HTTP/1.1 403 F\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 403 F\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcdXX0\r\n\r\n",
        b"HTTP/1.1 403 F\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
        b"HTTP/1.1 403 F\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab",
    ] {
        assert!(body_of(answer, &[]).await.is_err(), "{answer:?}");
    }
    let long_line = format!(
        "HTTP/1.1 403 F\r\nTransfer-Encoding: chunked\r\n\r\n1;{}\r\n",
        "x".repeat(MAX_LINE + 1)
    );
    assert!(body_of(long_line.as_bytes(), &[]).await.is_err());
}

fn chunk_encode(body: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = b"HTTP/1.1 403 F\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_vec();
    let mut rest = body;
    let mut sizes = sizes.iter().cycle();
    while !rest.is_empty() {
        let n = sizes.next().copied().unwrap_or(1).clamp(1, rest.len());
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

proptest! {
    /// However a chunked body is cut into chunks and into reads, the same bytes come out.
    #[test]
    fn chunked_bodies_decode_whatever_the_cuts(
        body in proptest::collection::vec(any::<u8>(), 0..3000),
        sizes in proptest::collection::vec(1usize..700, 1..8),
        cuts in proptest::collection::vec(0usize..4000, 0..12),
    ) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        let answer = chunk_encode(&body, &sizes);
        let runtime = tokio::runtime::Builder::new_current_thread().build();
        let decoded = runtime
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .block_on(body_of(&answer, &cuts))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decoded, body);
    }

    /// Arbitrary bytes after a head never panic the decoder, and what it yields is bounded
    /// by what it was given.
    #[test]
    fn arbitrary_bodies_never_panic(
        chunked in any::<bool>(),
        tail in proptest::collection::vec(any::<u8>(), 0..2000),
        cuts in proptest::collection::vec(0usize..2100, 0..8),
    ) {
        let mut answer = if chunked {
            b"HTTP/1.1 403 F\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()
        } else {
            b"HTTP/1.1 403 F\r\nContent-Length: 700\r\n\r\n".to_vec()
        };
        let head_len = answer.len();
        answer.extend_from_slice(&tail);
        let mut cuts = cuts;
        cuts.sort_unstable();
        let runtime = tokio::runtime::Builder::new_current_thread().build();
        let decoded = runtime
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .block_on(body_of(&answer, &cuts));
        if let Ok(bytes) = decoded {
            prop_assert!(bytes.len() <= answer.len() - head_len);
        }
    }
}

#[test]
fn get_head_writes_the_request_line_headers_in_order_and_the_blank_line() {
    let head = get_head(
        "/chat?room=1",
        [
            ("host", Field::Text("backend-1:9001")),
            ("x-raw", Field::Valid(b"a\xffb")),
            ("connection", Field::Valid(b"close")),
        ],
        0,
    );
    assert_eq!(
        head.as_deref(),
        Ok(&b"GET /chat?room=1 HTTP/1.1\r\nhost: backend-1:9001\r\nx-raw: a\xffb\r\nconnection: close\r\n\r\n"[..])
    );
    assert_eq!(
        get_head("/", [], 0).as_deref(),
        Ok(&b"GET / HTTP/1.1\r\n\r\n"[..])
    );
}

#[test]
fn get_head_refuses_what_would_split_the_head() {
    for target in ["", "/a b", "/a\r\nx: y", "/\x7f"] {
        assert_eq!(
            get_head(target, [], 0),
            Err("invalid request target"),
            "{target:?}"
        );
    }
    for value in ["a\r\nx: y", "a\nb", "\u{e9}", "\0"] {
        let headers = [("host", Field::Text(value))];
        assert_eq!(
            get_head("/", headers, 0),
            Err("invalid header value"),
            "{value:?}"
        );
    }
    assert!(get_head("/", [("x", Field::Text("tab\tand ~"))], 0).is_ok());
}
