//! Where a body ends (RFC 9112 §6): after `Content-Length` bytes, after the last chunk and
//! its trailers, or when the sender closes the connection; for clients' requests and pods'
//! answers alike. Bodies are taken as read, chunk data as it comes; only chunk-size lines
//! and trailers wait whole in the read buffer, and those are bounded.
use super::head::MAX_HEAD_BYTES;
use axum::body::Bytes;
use bytes::{Buf, BytesMut};

/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;

/// How a body is delimited, and how far it has been read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Framing {
    /// This many bytes more.
    Length(u64),
    Chunked(Chunk),
    /// Until the sender closes the connection.
    UntilClose,
    Done,
    /// The sender broke the framing: nothing past this is passed on.
    Failed(&'static str),
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Chunk {
    Size,
    /// This many bytes of a chunk's data more.
    Data(u64),
    /// The line break after a chunk's data.
    DataEnd,
    /// After the last chunk, with the trailer bytes seen so far.
    Trailers(usize),
}

/// What the body's next step is, from what has been read.
#[derive(Debug, PartialEq)]
pub(super) enum Step {
    /// Bytes of the body; `last`: the body ends with them.
    Data { bytes: Bytes, last: bool },
    /// The body has ended.
    End,
    /// More must be read first.
    More,
}

impl Framing {
    pub(super) fn chunked() -> Self {
        Self::Chunked(Chunk::Size)
    }

    /// The body's next step, taken off the front of `read`.
    pub(super) fn step(&mut self, read: &mut BytesMut) -> Result<Step, &'static str> {
        self.settle(read);
        let available = read.len() as u64;
        let (taken, next) = match *self {
            Self::Failed(why) => return Err(why),
            Self::Done => return Ok(Step::End),
            _ if available == 0 => return Ok(Step::More),
            Self::Length(left) => {
                let taken = left.min(available);
                (taken, Self::Length(left - taken))
            }
            Self::Chunked(Chunk::Data(left)) => {
                let taken = left.min(available);
                let next = if taken == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - taken)
                };
                (taken, Self::Chunked(next))
            }
            Self::UntilClose => (available, Self::UntilClose),
            Self::Chunked(_) => return Ok(Step::More),
        };
        // `taken` is at most `read.len()`, a usize.
        let bytes = read.split_to(taken as usize).freeze();
        *self = next;
        // Past the data: a body whose end is already here ends with these bytes. A broken
        // framing found there fails the next step, not these bytes.
        self.settle(read);
        Ok(Step::Data {
            bytes,
            last: *self == Self::Done,
        })
    }

    /// Goes through what is not data (chunk sizes, line breaks, trailers) as far as `read`
    /// allows.
    fn settle(&mut self, read: &mut BytesMut) {
        loop {
            let next = match *self {
                Self::Length(0) => Self::Done,
                Self::Chunked(Chunk::DataEnd) => match read.get(..2) {
                    Some(b"\r\n") => {
                        read.advance(2);
                        Self::Chunked(Chunk::Size)
                    }
                    None if read.first().is_none_or(|b| *b == b'\r') => return,
                    _ => Self::Failed("no line break after a chunk"),
                },
                Self::Chunked(Chunk::Size) => match line(read, MAX_CHUNK_LINE) {
                    Ok(None) => return,
                    Ok(Some(end)) => match chunk_size(&read[..end]) {
                        Ok(size) => {
                            read.advance(end + 2);
                            Self::Chunked(if size == 0 {
                                Chunk::Trailers(0)
                            } else {
                                Chunk::Data(size)
                            })
                        }
                        Err(why) => Self::Failed(why),
                    },
                    Err(why) => Self::Failed(why),
                },
                Self::Chunked(Chunk::Trailers(seen)) => {
                    match line(read, MAX_HEAD_BYTES.saturating_sub(seen)) {
                        Ok(None) => return,
                        Ok(Some(0)) => {
                            read.advance(2);
                            Self::Done
                        }
                        Ok(Some(end)) => {
                            // Trailers are not passed on: kandle's pods send none, and
                            // each side's HTTP/1.1 framing is the gateway's own.
                            read.advance(end + 2);
                            Self::Chunked(Chunk::Trailers(seen + end + 2))
                        }
                        Err(why) => Self::Failed(why),
                    }
                }
                _ => return,
            };
            *self = next;
        }
    }
}

/// Where the line at the front of `read` ends (its `\r\n` excluded), once it is all there.
fn line(read: &[u8], limit: usize) -> Result<Option<usize>, &'static str> {
    match read
        .iter()
        .take(limit.saturating_add(2))
        .position(|b| *b == b'\n')
    {
        Some(0) => Err("a bare line feed"),
        Some(end) if read[end - 1] == b'\r' => Ok(Some(end - 1)),
        Some(_) => Err("a bare line feed"),
        None if read.len() >= limit.saturating_add(2) => Err("a chunk line or trailers too long"),
        None => Ok(None),
    }
}

/// A chunk-size line's size: hex digits, then nothing or its extensions.
fn chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = &line[digits..];
    if digits == 0 || digits > 16 || !(rest.is_empty() || matches!(rest[0], b';' | b' ' | b'\t')) {
        return Err("an invalid chunk size");
    }
    let digits = std::str::from_utf8(&line[..digits]).map_err(|_| "an invalid chunk size")?;
    u64::from_str_radix(digits, 16).map_err(|_| "an invalid chunk size")
}

/// A `Content-Length` value: decimal digits only.
pub(super) fn content_length(value: &[u8]) -> Result<u64, &'static str> {
    let invalid = "an invalid Content-Length";
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(invalid);
    }
    std::str::from_utf8(value)
        .ok()
        .and_then(|digits| digits.parse().ok())
        .ok_or(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The body `framing` reads from `wire` handed over in pieces of `piece` bytes: its
    /// data, whether it ended, and what is left past its end.
    fn read_in_pieces(
        mut framing: Framing,
        wire: &[u8],
        piece: usize,
    ) -> Result<(Vec<u8>, bool, Vec<u8>), &'static str> {
        let mut read = BytesMut::new();
        let mut data = Vec::new();
        let mut pieces = wire.chunks(piece);
        let ended = loop {
            match framing.step(&mut read)? {
                Step::Data { bytes, last } => {
                    data.extend_from_slice(&bytes);
                    if last {
                        break true;
                    }
                }
                Step::End => break true,
                Step::More => match pieces.next() {
                    Some(piece) => read.extend_from_slice(piece),
                    None => break false,
                },
            }
        };
        read.extend(pieces.flatten());
        Ok((data, ended, read.to_vec()))
    }

    #[test]
    fn chunked_bodies_end_at_their_last_chunk_however_they_arrive() {
        let wire = b"5\r\nhello\r\n7;name=value\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for piece in 1..wire.len() {
            let (data, ended, _) = read_in_pieces(Framing::chunked(), wire, piece).unwrap();
            assert_eq!((data.as_slice(), ended), (&b"hello, world"[..], true));
        }
        let mut read = BytesMut::from(&wire[..]);
        let mut framing = Framing::chunked();
        while let Step::Data { last: false, .. } = framing.step(&mut read).unwrap() {}
        assert_eq!(&read[..], b"NEXT", "nothing past the body is taken");
    }

    #[test]
    fn the_last_data_says_so_when_the_end_came_with_it() {
        let mut read = BytesMut::from(&b"2\r\nok\r\n0\r\n\r\n"[..]);
        let step = Framing::chunked().step(&mut read).unwrap();
        assert_eq!(
            step,
            Step::Data {
                bytes: Bytes::from_static(b"ok"),
                last: true
            }
        );
        let mut read = BytesMut::from(&b"hello"[..]);
        let step = Framing::Length(5).step(&mut read).unwrap();
        assert_eq!(
            step,
            Step::Data {
                bytes: Bytes::from_static(b"hello"),
                last: true
            }
        );
    }

    #[test]
    fn a_length_takes_that_many_bytes_and_no_more() {
        let (data, ended, left) = read_in_pieces(Framing::Length(5), b"hello, world", 3).unwrap();
        assert_eq!((data.as_slice(), ended), (&b"hello"[..], true));
        assert_eq!(left, b", world");
        let (data, ended, _) = read_in_pieces(Framing::Length(8), b"hello", 2).unwrap();
        assert_eq!(
            (data.as_slice(), ended),
            (&b"hello"[..], false),
            "short: not ended"
        );
    }

    #[test]
    fn broken_chunking_fails_after_the_data_before_it() {
        for (wire, why) in [
            (&b"2\r\nokX\r\n"[..], "no line break after a chunk"),
            (b"zz\r\n", "an invalid chunk size"),
            (b"\r\n", "an invalid chunk size"),
            (b"11111111111111111\r\n", "an invalid chunk size"),
            (b"5 x\nhello", "a bare line feed"),
            (b"2\r\nok\r\n0\r\nx: 1\n\r\n", "a bare line feed"),
        ] {
            assert_eq!(read_in_pieces(Framing::chunked(), wire, 1), Err(why));
        }
        let mut read = BytesMut::from(&b"2\r\nokX"[..]);
        let mut framing = Framing::chunked();
        let first = framing.step(&mut read).unwrap();
        assert_eq!(
            first,
            Step::Data {
                bytes: Bytes::from_static(b"ok"),
                last: false
            }
        );
        assert!(framing.step(&mut read).is_err());
    }

    #[test]
    fn chunk_lines_and_trailers_are_bounded() {
        let long_line = [b'1'].repeat(MAX_CHUNK_LINE + 10);
        assert!(read_in_pieces(Framing::chunked(), &long_line, 512).is_err());
        let mut trailers = b"0\r\n".to_vec();
        while trailers.len() < 2 * MAX_HEAD_BYTES {
            trailers.extend_from_slice(b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(read_in_pieces(Framing::chunked(), &trailers, 4096).is_err());
    }

    #[test]
    fn content_lengths_are_plain_decimal() {
        assert_eq!(content_length(b"42").unwrap(), 42);
        for bad in [
            &b""[..],
            b"-1",
            b"+1",
            b"1 ",
            b"0x10",
            b"1,1",
            b"99999999999999999999",
        ] {
            assert!(content_length(bad).is_err(), "{bad:?}");
        }
    }
}
