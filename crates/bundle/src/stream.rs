//! The pieces that let a bundle be read and written as a stream at disk speed (issue 13), without ever acting on
//! bytes before they verify:
//! - [`Fanout`]: hands each chunk of a stream to worker threads that fold it into a digest (the file hash, the
//!   compressed payload's hash, the payload's hash, the tensor hashes), so hashing runs beside reading,
//!   decompressing and compressing on the other core. Chunk buffers are recycled, so memory stays at a few chunks
//!   whatever the file size, and every buffer is allocated on the calling thread (the testkit's per-thread memory
//!   meter sees them).
//! - [`FrameWalker`]: follows a zstd frame's block headers as the bytes arrive, and answers exactly what
//!   `ZSTD_findFrameCompressedSize` answers for the whole frame (one complete frame, nothing after it), without
//!   holding the frame.
//! - [`TensorCheck`]: compares the start of a decompressed payload with the canonical safetensors header and
//!   hashes every tensor's bytes as they stream past.

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

/// Size of one chunk of a stream. Small enough that a few in flight cost little memory, large enough that the
/// per-chunk overhead (a channel send per worker) is invisible.
pub(crate) const CHUNK: usize = 1 << 20;
/// Chunks queued per worker before the producer waits.
const DEPTH: usize = 4;
/// Chunk buffers kept for reuse.
const POOL: usize = DEPTH + 4;

/// State folded over every chunk of a stream on a worker thread.
pub(crate) trait Fold: Send {
    /// Take the next bytes of the stream.
    fn feed(&mut self, bytes: &[u8]);
}

impl Fold for Sha256 {
    fn feed(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

/// Start a worker folding chunks into `state`; it ends when the sender is dropped, and joining the handle gives
/// the state back.
pub(crate) fn spawn_fold<S: Fold + 'static>(
    mut state: S,
) -> (SyncSender<Arc<Vec<u8>>>, JoinHandle<S>) {
    let (tx, rx) = sync_channel::<Arc<Vec<u8>>>(DEPTH);
    let handle = std::thread::spawn(move || {
        for chunk in rx {
            state.feed(&chunk);
        }
        state
    });
    (tx, handle)
}

/// Join a worker, passing on its panic (a bug, never input-dependent).
pub(crate) fn join<S>(h: JoinHandle<S>) -> S {
    match h.join() {
        Ok(s) => s,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// Sends each chunk to every worker, and recycles the chunk buffers once all of them are done with one.
pub(crate) struct Fanout {
    workers: Vec<SyncSender<Arc<Vec<u8>>>>,
    in_flight: VecDeque<Arc<Vec<u8>>>,
}

impl Fanout {
    pub(crate) fn new(workers: Vec<SyncSender<Arc<Vec<u8>>>>) -> Fanout {
        Fanout {
            workers,
            in_flight: VecDeque::new(),
        }
    }

    /// An empty buffer with room for `cap` bytes: a recycled one when the workers are done with the oldest.
    pub(crate) fn buffer(&mut self, cap: usize) -> Vec<u8> {
        if let Some(front) = self.in_flight.front() {
            if Arc::strong_count(front) == 1 {
                if let Some(Ok(mut v)) = self.in_flight.pop_front().map(Arc::try_unwrap) {
                    if v.capacity() >= cap {
                        v.clear();
                        return v;
                    }
                }
            }
        }
        Vec::with_capacity(cap)
    }

    /// Hand `chunk` to every worker (waiting while a queue is full) and return it for the caller's own use.
    pub(crate) fn send(&mut self, chunk: Vec<u8>) -> Arc<Vec<u8>> {
        let chunk = Arc::new(chunk);
        for w in &self.workers {
            // A worker only stops taking chunks by panicking, which `join` passes on.
            let _ = w.send(Arc::clone(&chunk));
        }
        self.in_flight.push_back(Arc::clone(&chunk));
        if self.in_flight.len() > POOL {
            self.in_flight.pop_front();
        }
        chunk
    }
}

/// What is wrong with a payload frame, in the words `open` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameProblem {
    /// The payload does not start with the zstd frame magic.
    NotZstd,
    /// The frame header or a block header is invalid, or the data ends inside the frame.
    Damaged,
    /// Bytes follow the end of the frame.
    Extra,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    Head,
    BlockHeader { got: usize },
    BlockBody { left: u64, last: bool },
    Checksum { left: usize },
    Done,
    Failed(FrameProblem),
}

/// Follows one zstd frame through a stream: header, block headers, checksum (RFC 8878 §3.1).
pub(crate) struct FrameWalker {
    head: Vec<u8>,
    head_size: Option<usize>,
    block: [u8; 3],
    checksum: bool,
    state: Walk,
}

/// The largest zstd frame header (magic 4, descriptor 1, window 1, dictionary id 4, content size 8).
const MAX_HEAD: usize = 18;
const ZSTD_MAGIC: u32 = 0xFD2F_B528;

impl FrameWalker {
    pub(crate) fn new() -> FrameWalker {
        FrameWalker {
            head: Vec::with_capacity(MAX_HEAD),
            head_size: None,
            block: [0; 3],
            checksum: false,
            state: Walk::Head,
        }
    }

    /// The whole frame header once it has arrived (and is valid).
    pub(crate) fn header(&self) -> Option<&[u8]> {
        match self.state {
            Walk::Head | Walk::Failed(FrameProblem::NotZstd) => None,
            _ if self.head_size == Some(self.head.len()) => Some(&self.head),
            _ => None,
        }
    }

    /// Whether the walk has failed already (nothing later can mend it).
    pub(crate) fn failed(&self) -> bool {
        matches!(self.state, Walk::Failed(_))
    }

    pub(crate) fn feed(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            match self.state {
                Walk::Failed(_) => return,
                Walk::Done => {
                    self.state = Walk::Failed(FrameProblem::Extra);
                    return;
                }
                Walk::Head => {
                    let want = self.head_size.unwrap_or(5);
                    let n = (want - self.head.len()).min(b.len());
                    self.head.extend_from_slice(&b[..n]);
                    b = &b[n..];
                    if self.head.len() >= 4 && self.head[..4] != ZSTD_MAGIC.to_le_bytes() {
                        self.state = Walk::Failed(FrameProblem::NotZstd);
                        return;
                    }
                    if self.head_size.is_none() && self.head.len() == 5 {
                        let fhd = self.head[4];
                        let single = fhd & 0x20 != 0;
                        let dict = [0usize, 1, 2, 4][usize::from(fhd & 3)];
                        let fcs = match fhd >> 6 {
                            0 => usize::from(single),
                            1 => 2,
                            2 => 4,
                            _ => 8,
                        };
                        self.head_size = Some(5 + usize::from(!single) + dict + fcs);
                        self.checksum = fhd & 0x04 != 0;
                    }
                    if self.head_size == Some(self.head.len()) {
                        // libzstd's own header parser decides validity (reserved bit, window range...).
                        self.state = match zstd::zstd_safe::get_frame_content_size(&self.head) {
                            Ok(_) => Walk::BlockHeader { got: 0 },
                            Err(_) => Walk::Failed(FrameProblem::Damaged),
                        };
                    }
                }
                Walk::BlockHeader { got } => {
                    let n = (3 - got).min(b.len());
                    self.block[got..got + n].copy_from_slice(&b[..n]);
                    b = &b[n..];
                    if got + n < 3 {
                        self.state = Walk::BlockHeader { got: got + n };
                        continue;
                    }
                    let h = u32::from_le_bytes([self.block[0], self.block[1], self.block[2], 0]);
                    let last = h & 1 != 0;
                    let size = u64::from(h >> 3);
                    self.state = match (h >> 1) & 3 {
                        3 => Walk::Failed(FrameProblem::Damaged),
                        1 => Walk::BlockBody { left: 1, last },
                        _ => Walk::BlockBody { left: size, last },
                    };
                    self.settle();
                }
                Walk::BlockBody { left, last } => {
                    let n = left.min(b.len() as u64);
                    b = &b[n as usize..];
                    self.state = Walk::BlockBody {
                        left: left - n,
                        last,
                    };
                    self.settle();
                }
                Walk::Checksum { left } => {
                    let n = left.min(b.len());
                    b = &b[n..];
                    self.state = if left == n {
                        Walk::Done
                    } else {
                        Walk::Checksum { left: left - n }
                    };
                }
            }
        }
    }

    /// Leave a finished block.
    fn settle(&mut self) {
        if let Walk::BlockBody { left: 0, last } = self.state {
            self.state = match (last, self.checksum) {
                (false, _) => Walk::BlockHeader { got: 0 },
                (true, true) => Walk::Checksum { left: 4 },
                (true, false) => Walk::Done,
            };
        }
    }

    /// The verdict once the stream has ended.
    pub(crate) fn finish(&self) -> Result<(), FrameProblem> {
        match self.state {
            Walk::Done => Ok(()),
            Walk::Failed(p) => Err(p),
            Walk::Head if self.head.len() < 4 => Err(FrameProblem::NotZstd),
            _ => Err(FrameProblem::Damaged),
        }
    }
}

/// Follows a canonical payload as it streams past: compares its start with the canonical safetensors header
/// and computes each tensor's SHA-256 (checked against the signed list by a reader, recorded by a writer).
pub(crate) struct TensorHashes {
    header: Vec<u8>,
    /// End offset (in the payload) of each tensor, in order.
    ends: Vec<u64>,
    header_ok: bool,
    pos: u64,
    hasher: Sha256,
    digests: Vec<[u8; 32]>,
}

impl TensorHashes {
    /// `header` is the canonical header, `lens` the tensors' byte lengths in order.
    pub(crate) fn new(header: Vec<u8>, lens: impl IntoIterator<Item = u64>) -> TensorHashes {
        let mut end = header.len() as u64;
        let ends = lens
            .into_iter()
            .map(|len| {
                end = end.saturating_add(len);
                end
            })
            .collect::<Vec<_>>();
        let mut t = TensorHashes {
            header,
            digests: Vec::with_capacity(ends.len()),
            ends,
            header_ok: true,
            pos: 0,
            hasher: Sha256::new(),
        };
        t.settle();
        t
    }

    fn settle(&mut self) {
        while self.pos >= self.header.len() as u64
            && self.digests.len() < self.ends.len()
            && self.pos == self.ends[self.digests.len()]
        {
            let digest = std::mem::take(&mut self.hasher).finalize();
            self.digests.push(digest.into());
        }
    }

    /// Whether `total` bytes in all were exactly the header and the tensors.
    pub(crate) fn layout_ok(&self, total: u64) -> bool {
        let end = self
            .ends
            .last()
            .copied()
            .unwrap_or(self.header.len() as u64);
        self.header_ok && self.pos >= self.header.len() as u64 && end == total
    }

    /// The tensors' digests, in order (all of them once the layout is complete).
    pub(crate) fn digests(&self) -> &[[u8; 32]] {
        &self.digests
    }
}

impl Fold for TensorHashes {
    fn feed(&mut self, mut b: &[u8]) {
        let hl = self.header.len() as u64;
        while !b.is_empty() {
            if self.pos < hl {
                let at = self.pos as usize;
                let n = (self.header.len() - at).min(b.len());
                if self.header[at..at + n] != b[..n] {
                    self.header_ok = false;
                }
                self.pos += n as u64;
                b = &b[n..];
                self.settle();
                continue;
            }
            let Some(&end) = self.ends.get(self.digests.len()) else {
                self.pos += b.len() as u64;
                return;
            };
            let n = (end - self.pos).min(b.len() as u64) as usize;
            self.hasher.update(&b[..n]);
            self.pos += n as u64;
            b = &b[n..];
            self.settle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walker agrees with libzstd's `find_frame_compressed_size` on real frames cut at every length and
    /// followed by extra bytes, fed in pieces of every size.
    #[test]
    fn walker_agrees_with_libzstd() {
        let data: Vec<u8> = (0..200_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 7) as u8)
            .collect();
        let mut frames = Vec::new();
        for (level, checksum) in [(1, true), (3, false), (19, true)] {
            let mut c = zstd::bulk::Compressor::new(level).unwrap();
            c.include_checksum(checksum).unwrap();
            c.include_contentsize(true).unwrap();
            frames.push(c.compress(&data).unwrap());
        }
        frames.push(zstd::bulk::compress(&[7u8; 100_000], 3).unwrap()); // RLE blocks
        for frame in &frames {
            let mut cases: Vec<Vec<u8>> = (0..frame.len().min(40))
                .chain([frame.len() - 1, frame.len() - 3])
                .map(|n| frame[..n].to_vec())
                .collect();
            cases.push(frame.clone());
            let mut extra = frame.clone();
            extra.push(0);
            cases.push(extra);
            for case in &cases {
                let lib = match zstd::zstd_safe::find_frame_compressed_size(case) {
                    _ if case.len() < 4 || case[..4] != ZSTD_MAGIC.to_le_bytes() => {
                        Err(FrameProblem::NotZstd)
                    }
                    Ok(n) if n == case.len() => Ok(()),
                    Ok(_) => Err(FrameProblem::Extra),
                    Err(_) => Err(FrameProblem::Damaged),
                };
                for piece in [1, 2, 3, 7, 4096, usize::MAX] {
                    let mut w = FrameWalker::new();
                    for c in case.chunks(piece.min(case.len().max(1))) {
                        w.feed(c);
                    }
                    assert_eq!(w.finish(), lib, "len {} piece {piece}", case.len());
                }
            }
        }
    }

    #[test]
    fn tensor_hashes_follow_the_layout() {
        let digest = |b: &[u8]| -> [u8; 32] { Sha256::digest(b).into() };
        let stream = b"HDR!aaaabb";
        for piece in [1, 3, 100] {
            let mut t = TensorHashes::new(b"HDR!".to_vec(), [4, 0, 2]);
            stream.chunks(piece).for_each(|c| t.feed(c));
            assert!(t.layout_ok(10) && !t.layout_ok(11));
            assert_eq!(t.digests(), [digest(b"aaaa"), digest(b""), digest(b"bb")]);
            let mut t = TensorHashes::new(b"HDR!".to_vec(), [4, 2]);
            b"HDR?aaaabb".chunks(piece).for_each(|c| t.feed(c));
            assert!(!t.layout_ok(10));
        }
    }
}
