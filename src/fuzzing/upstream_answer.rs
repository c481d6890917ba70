//! The `upstream_answer` target: a backend's answer to the upstream handshake through the
//! head parser and the refusal body's decoder (`upstream::http1`).

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use super::RUNTIME;

/// Larger inputs are cut here: four times the answer-head bound.
pub const UPSTREAM_ANSWER_MAX_INPUT: usize = 4 * crate::upstream::http1::MAX_HEAD;

/// Runs arbitrary bytes as a backend's answer to the upstream handshake: the head parser,
/// then, for anything but a 101, the refusal body's decoder (`upstream::http1`).
///
/// Layout of `data`: byte 0 picks how many bytes each read hands out (1..=256); the rest
/// is the stream. Oracles: a head is taken from at most its bound plus one read; a body
/// never yields more bytes than followed its head.
pub fn upstream_answer(data: &[u8]) {
    let data = data.get(..UPSTREAM_ANSWER_MAX_INPUT).unwrap_or(data);
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let reader = Trickle {
        rest: stream,
        step: usize::from(step) + 1,
        handed: 0,
    };
    RUNTIME.with(|runtime| {
        if let Some(runtime) = runtime {
            runtime.block_on(answer_and_body(reader));
        }
    });
}

async fn answer_and_body(mut reader: Trickle<'_>) {
    use crate::upstream::http1;
    use http_body_util::BodyExt;
    let mut buf = bytes::BytesMut::new();
    let head = http1::read_head(&mut reader, &mut buf).await;
    assert!(
        reader.handed <= http1::MAX_HEAD + 4096 + reader.step,
        "the answer head read {} bytes",
        reader.handed
    );
    let Ok(head) = head else {
        return;
    };
    if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    let after_head = buf.len() + reader.rest.len();
    let Ok(body) = http1::RefusalBody::new(&head, reader, buf) else {
        return;
    };
    if let Ok(collected) = body.collect().await {
        let got = collected.to_bytes().len();
        assert!(got <= after_head, "{got} body bytes from {after_head}");
    }
}

/// A stream that hands out at most `step` bytes per read.
struct Trickle<'a> {
    rest: &'a [u8],
    step: usize,
    handed: usize,
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.step.min(self.rest.len()).min(buf.remaining());
        let (now, later) = self.rest.split_at(n);
        buf.put_slice(now);
        self.rest = later;
        self.handed += n;
        Poll::Ready(Ok(()))
    }
}
