//! The chunk stream protocol, `/tapestry/chunks/1`: many chunks on one
//! stream, so a payload of hundreds of megabytes moves at the transport's
//! pace instead of one request and one CBOR-framed answer per chunk.
//!
//! The requester opens a stream and writes one request: a count `n`
//! (u16, little-endian, 1 to [`MAX_BATCH`]) and `n` chunk ids (32 bytes
//! each, BLAKE3). The server answers with one frame per id, in the
//! request's order, then closes the stream:
//!
//! - `0x00`, a length (u32, little-endian, at most
//!   [`tapestry_protocol::MAX_CHUNK_SIZE`]) and that many bytes: the chunk;
//! - `0x01`: the server does not hold that chunk (or will not serve it);
//! - `0x02`, only as the first and last frame: the server is busy; ask
//!   again later or elsewhere.
//!
//! The requester checks every chunk against its id as it arrives (a peer
//! that serves a wrong one is caught at that chunk, not at the end), and
//! every read and write is bounded by a timeout. Framing only here; what is
//! served and what is kept is the node's (`runtime::serve`,
//! `runtime::fetch`).

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use tapestry_protocol::{ContentId, MAX_CHUNK_SIZE};

/// The protocol's name.
pub const CHUNKS_PROTOCOL: StreamProtocol = StreamProtocol::new("/tapestry/chunks/1");
/// Most chunk ids one request may name (64 chunks of the default 256 KiB
/// are 16 MiB: enough to keep a stream busy, small enough that a batch
/// lost to a failing peer is cheap to ask again elsewhere).
pub const MAX_BATCH: usize = 64;

const CHUNK: u8 = 0;
const MISSING: u8 = 1;
const BUSY: u8 = 2;

/// One answer frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// The chunk's bytes (not yet checked against its id).
    Chunk(Vec<u8>),
    /// The server does not hold it.
    Missing,
    /// The server is busy: no more frames follow.
    Busy,
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"))
}

/// Writes a request for `ids` (1 to [`MAX_BATCH`] of them).
pub async fn write_request<W: AsyncWrite + Unpin>(w: &mut W, ids: &[ContentId]) -> io::Result<()> {
    if ids.is_empty() || ids.len() > MAX_BATCH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a request names 1 to {MAX_BATCH} chunks, not {}", ids.len()),
        ));
    }
    let mut buf = Vec::with_capacity(2 + 32 * ids.len());
    buf.extend_from_slice(&(ids.len() as u16).to_le_bytes());
    for id in ids {
        buf.extend_from_slice(id.as_bytes());
    }
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads a request: the ids asked for. A count of 0 or above
/// [`MAX_BATCH`] is refused before anything else is read.
pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Vec<ContentId>> {
    let mut n = [0u8; 2];
    r.read_exact(&mut n).await?;
    let n = u16::from_le_bytes(n) as usize;
    if n == 0 || n > MAX_BATCH {
        return Err(bad(format!(
            "a request names 1 to {MAX_BATCH} chunks, not {n}"
        )));
    }
    let mut ids = vec![0u8; 32 * n];
    r.read_exact(&mut ids).await?;
    Ok(ids
        .chunks_exact(32)
        .map(|c| {
            let mut id = [0u8; 32];
            id.copy_from_slice(c);
            ContentId::from_bytes(id)
        })
        .collect())
}

/// Writes a chunk frame.
pub async fn write_chunk<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|n| *n as usize <= MAX_CHUNK_SIZE)
        .ok_or_else(|| bad(format!("a chunk of {} bytes is too large", bytes.len())))?;
    let mut head = [0u8; 5];
    head[0] = CHUNK;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head).await?;
    w.write_all(bytes).await
}

/// Writes a "not held" frame.
pub async fn write_missing<W: AsyncWrite + Unpin>(w: &mut W) -> io::Result<()> {
    w.write_all(&[MISSING]).await
}

/// Writes the "busy" frame (the only one of its answer).
pub async fn write_busy<W: AsyncWrite + Unpin>(w: &mut W) -> io::Result<()> {
    w.write_all(&[BUSY]).await?;
    w.flush().await
}

/// Reads one answer frame. A length above
/// [`tapestry_protocol::MAX_CHUNK_SIZE`] or an unknown tag is refused before
/// any of its bytes are read.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Frame> {
    let mut tag = [0u8; 1];
    r.read_exact(&mut tag).await?;
    match tag[0] {
        CHUNK => {
            let mut len = [0u8; 4];
            r.read_exact(&mut len).await?;
            let len = u32::from_le_bytes(len) as usize;
            if len > MAX_CHUNK_SIZE {
                return Err(bad(format!(
                    "a chunk of {len} bytes is announced (at most {MAX_CHUNK_SIZE})"
                )));
            }
            let mut bytes = vec![0u8; len];
            r.read_exact(&mut bytes).await?;
            Ok(Frame::Chunk(bytes))
        }
        MISSING => Ok(Frame::Missing),
        BUSY => Ok(Frame::Busy),
        t => Err(bad(format!("unknown frame tag {t}"))),
    }
}

/// The answers to one request, read frame by frame, each within a timeout.
pub struct ChunkReader<S> {
    stream: S,
    left: VecDeque<ContentId>,
    timeout: Duration,
    /// Ended early: by `Busy` or an error.
    ended: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ChunkReader<S> {
    /// Sends a request for `ids` on `stream` (within `timeout`) and returns
    /// the reader of its answers.
    pub async fn request(
        mut stream: S,
        ids: &[ContentId],
        timeout: Duration,
    ) -> io::Result<ChunkReader<S>> {
        tokio::time::timeout(timeout, write_request(&mut stream, ids))
            .await
            .map_err(|_| timed_out("sending a chunk request"))??;
        Ok(ChunkReader {
            stream,
            left: ids.iter().copied().collect(),
            timeout,
            ended: false,
        })
    }

    /// The next id asked for and its frame; `None` once every id has had
    /// one, or after `Busy` or an error. A chunk frame's bytes are not
    /// checked here.
    pub async fn next(&mut self) -> Option<io::Result<(ContentId, Frame)>> {
        if self.ended {
            return None;
        }
        let id = *self.left.front()?;
        let frame = match tokio::time::timeout(self.timeout, read_frame(&mut self.stream)).await {
            Err(_) => Err(timed_out("reading a chunk")),
            Ok(r) => r,
        };
        match frame {
            Ok(Frame::Busy) => {
                self.ended = true;
                Some(Ok((id, Frame::Busy)))
            }
            Ok(f) => {
                self.left.pop_front();
                Some(Ok((id, f)))
            }
            Err(e) => {
                self.ended = true;
                Some(Err(e))
            }
        }
    }

    /// The ids asked for that have had no frame yet (after `Busy`, all of
    /// them).
    pub fn unanswered(&self) -> impl Iterator<Item = ContentId> + '_ {
        self.left.iter().copied()
    }

    /// Closes the stream (best effort, bounded by the timeout).
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(self.timeout, self.stream.close()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    fn id(n: u8) -> ContentId {
        ContentId::of(&[n])
    }

    #[tokio::test]
    async fn a_request_and_its_frames_round_trip() {
        let ids = [id(1), id(2), id(3)];
        let mut buf = Cursor::new(Vec::new());
        write_request(&mut buf, &ids).await.unwrap();
        buf.set_position(0);
        assert_eq!(read_request(&mut buf).await.unwrap(), ids);

        let mut buf = Cursor::new(Vec::new());
        write_chunk(&mut buf, b"hello").await.unwrap();
        write_missing(&mut buf).await.unwrap();
        write_chunk(&mut buf, b"").await.unwrap();
        write_busy(&mut buf).await.unwrap();
        buf.set_position(0);
        assert_eq!(
            read_frame(&mut buf).await.unwrap(),
            Frame::Chunk(b"hello".to_vec())
        );
        assert_eq!(read_frame(&mut buf).await.unwrap(), Frame::Missing);
        assert_eq!(
            read_frame(&mut buf).await.unwrap(),
            Frame::Chunk(Vec::new())
        );
        assert_eq!(read_frame(&mut buf).await.unwrap(), Frame::Busy);
        assert!(read_frame(&mut buf).await.is_err(), "past the end");
    }

    #[tokio::test]
    async fn malformed_requests_are_refused() {
        for n in [0u16, MAX_BATCH as u16 + 1, u16::MAX] {
            let mut buf = Cursor::new(n.to_le_bytes().to_vec());
            let e = read_request(&mut buf).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "count {n}");
        }
        // Fewer ids than counted.
        let mut short = 2u16.to_le_bytes().to_vec();
        short.extend_from_slice(id(1).as_bytes());
        let e = read_request(&mut Cursor::new(short)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // And none are written.
        let mut sink = Cursor::new(Vec::new());
        assert!(write_request(&mut sink, &[]).await.is_err());
        assert!(
            write_request(&mut sink, &vec![id(1); MAX_BATCH + 1])
                .await
                .is_err()
        );
        assert!(sink.get_ref().is_empty());
    }

    #[tokio::test]
    async fn malformed_frames_are_refused_before_their_bytes_are_read() {
        // Announced above the largest chunk: refused at the length.
        let mut big = vec![CHUNK];
        big.extend_from_slice(&(MAX_CHUNK_SIZE as u32 + 1).to_le_bytes());
        let e = read_frame(&mut Cursor::new(big)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("announced"), "{e}");
        // Truncated.
        let mut cut = vec![CHUNK];
        cut.extend_from_slice(&10u32.to_le_bytes());
        cut.extend_from_slice(b"short");
        let e = read_frame(&mut Cursor::new(cut)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // Unknown tag.
        let e = read_frame(&mut Cursor::new(vec![7u8])).await.unwrap_err();
        assert!(e.to_string().contains("tag 7"), "{e}");
        // Too large to send.
        let mut sink = Cursor::new(Vec::new());
        assert!(
            write_chunk(&mut sink, &vec![0; MAX_CHUNK_SIZE + 1])
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn the_reader_pairs_frames_with_ids_and_stops_at_busy_or_an_error() {
        let ids = [id(1), id(2), id(3)];
        // The answers: a chunk, not held, then the stream ends early.
        let mut answers = Cursor::new(Vec::new());
        write_chunk(&mut answers, b"one").await.unwrap();
        write_missing(&mut answers).await.unwrap();
        let stream = Duplex {
            read: Cursor::new(answers.into_inner()),
            written: Vec::new(),
        };
        let mut r = ChunkReader::request(stream, &ids, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            r.next().await.unwrap().unwrap(),
            (id(1), Frame::Chunk(b"one".to_vec()))
        );
        assert_eq!(r.next().await.unwrap().unwrap(), (id(2), Frame::Missing));
        assert_eq!(r.unanswered().collect::<Vec<_>>(), vec![id(3)]);
        assert!(r.next().await.unwrap().is_err(), "the stream ended");
        assert!(r.next().await.is_none());
        assert_eq!(r.unanswered().collect::<Vec<_>>(), vec![id(3)]);
        // What was sent is the request.
        let mut sent = Cursor::new(r.stream.written.clone());
        assert_eq!(read_request(&mut sent).await.unwrap(), ids);

        let mut busy = Cursor::new(Vec::new());
        write_busy(&mut busy).await.unwrap();
        let stream = Duplex {
            read: Cursor::new(busy.into_inner()),
            written: Vec::new(),
        };
        let mut r = ChunkReader::request(stream, &ids, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(r.next().await.unwrap().unwrap(), (id(1), Frame::Busy));
        assert!(r.next().await.is_none());
        assert_eq!(r.unanswered().count(), 3);
    }

    /// A stream that reads from a buffer and keeps what is written.
    struct Duplex {
        read: Cursor<Vec<u8>>,
        written: Vec<u8>,
    }

    impl AsyncRead for Duplex {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::pin::Pin::new(&mut self.read).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Duplex {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.written.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }
}
