//! Reassembles WebSocket data frames into messages, enforcing the message size limit across
//! fragments and validating UTF-8 as text arrives (failing fast, as RFC 6455 §8.1 asks). A
//! permessage-deflate message (RSV1 on its first frame) is inflated frame by frame, the limit
//! applying to the inflated size, with inflate state only while such a message is in progress.

use bytes::Bytes;

use super::deflate::{InflateError, Inflater};
use super::frame::{Frame, OpCode};

/// A complete data message.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Text(Bytes),
    Binary(Bytes),
}

/// Why a frame sequence is not acceptable; each maps to an RFC 6455 close code.
#[derive(Debug, PartialEq, Eq)]
pub enum MessageError {
    /// 1009
    TooBig,
    /// 1007
    InvalidUtf8,
    /// 1007: a compressed message that does not inflate.
    BadCompression,
    /// 1002
    Protocol(&'static str),
}

impl From<InflateError> for MessageError {
    fn from(e: InflateError) -> Self {
        match e {
            InflateError::TooBig => MessageError::TooBig,
            InflateError::Corrupt => MessageError::BadCompression,
        }
    }
}

struct Partial {
    text: bool,
    data: Vec<u8>,
    /// Prefix of `data` known to be valid UTF-8 (text only).
    valid: usize,
    /// Present while a compressed message is in progress.
    inflater: Option<Box<Inflater>>,
}

/// Collects data frames into messages.
pub struct Assembler {
    max_size: usize,
    partial: Option<Partial>,
}

impl Assembler {
    pub fn new(max_size: usize) -> Self {
        Assembler {
            max_size,
            partial: None,
        }
    }

    /// Takes a Text, Binary or Continuation frame; returns a message when one is complete.
    pub fn push(&mut self, frame: Frame) -> Result<Option<Message>, MessageError> {
        match frame.opcode {
            OpCode::Text | OpCode::Binary => {
                if self.partial.is_some() {
                    return Err(MessageError::Protocol(
                        "new message inside a fragmented one",
                    ));
                }
                let text = frame.opcode == OpCode::Text;
                if frame.compressed {
                    let mut partial = Partial {
                        text,
                        data: Vec::new(),
                        valid: 0,
                        inflater: Some(Inflater::new()),
                    };
                    return self.append(&mut partial, &frame).map(|done| {
                        if done {
                            Some(partial.finish())
                        } else {
                            self.partial = Some(partial);
                            None
                        }
                    });
                }
                if frame.payload.len() > self.max_size {
                    return Err(MessageError::TooBig);
                }
                if frame.fin {
                    // The common case: one frame, no copy.
                    let data = frame.payload;
                    if text && std::str::from_utf8(&data).is_err() {
                        return Err(MessageError::InvalidUtf8);
                    }
                    return Ok(Some(if text {
                        Message::Text(data)
                    } else {
                        Message::Binary(data)
                    }));
                }
                let mut partial = Partial {
                    text,
                    data: frame.payload.to_vec(),
                    valid: 0,
                    inflater: None,
                };
                check_utf8(&mut partial, false)?;
                self.partial = Some(partial);
                Ok(None)
            }
            OpCode::Continuation => {
                let Some(mut partial) = self.partial.take() else {
                    return Err(MessageError::Protocol("continuation without a message"));
                };
                if self.append(&mut partial, &frame)? {
                    Ok(Some(partial.finish()))
                } else {
                    self.partial = Some(partial);
                    Ok(None)
                }
            }
            _ => Err(MessageError::Protocol("not a data frame")),
        }
    }

    /// Adds a frame's payload (inflated if the message is compressed); true when it was the last.
    fn append(&self, partial: &mut Partial, frame: &Frame) -> Result<bool, MessageError> {
        match partial.inflater.as_mut() {
            Some(inflater) => {
                inflater.inflate(&frame.payload, frame.fin, &mut partial.data, self.max_size)?;
            }
            None => {
                if partial.data.len() + frame.payload.len() > self.max_size {
                    return Err(MessageError::TooBig);
                }
                partial.data.extend_from_slice(&frame.payload);
            }
        }
        check_utf8(partial, frame.fin)?;
        Ok(frame.fin)
    }
}

impl Partial {
    fn finish(self) -> Message {
        let data = Bytes::from(self.data);
        if self.text {
            Message::Text(data)
        } else {
            Message::Binary(data)
        }
    }
}

/// Validates the text received so far; an incomplete character at the end is fine until `fin`.
fn check_utf8(partial: &mut Partial, fin: bool) -> Result<(), MessageError> {
    if !partial.text {
        return Ok(());
    }
    match std::str::from_utf8(&partial.data[partial.valid..]) {
        Ok(_) => {
            partial.valid = partial.data.len();
            Ok(())
        }
        Err(e) if e.error_len().is_none() && !fin => {
            partial.valid += e.valid_up_to();
            Ok(())
        }
        Err(_) => Err(MessageError::InvalidUtf8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::ws::deflate::compress;

    fn frame(fin: bool, opcode: OpCode, data: &[u8]) -> Frame {
        Frame {
            fin,
            compressed: false,
            opcode,
            payload: Bytes::copy_from_slice(data),
        }
    }

    fn compressed(fin: bool, opcode: OpCode, data: &[u8]) -> Frame {
        Frame {
            compressed: opcode != OpCode::Continuation,
            ..frame(fin, opcode, data)
        }
    }

    #[test]
    fn inflates_compressed_messages_fragmented_or_not() {
        let text = "{\"op\":\"ping\",\"id\":1} €".repeat(20);
        let deflated = compress(text.as_bytes(), 15);
        let mut a = Assembler::new(1000);
        assert_eq!(
            a.push(compressed(true, OpCode::Text, &deflated)),
            Ok(Some(Message::Text(Bytes::from(text.clone()))))
        );
        let (head, tail) = deflated.split_at(deflated.len() / 2);
        assert_eq!(a.push(compressed(false, OpCode::Text, head)), Ok(None));
        assert_eq!(
            a.push(compressed(true, OpCode::Continuation, tail)),
            Ok(Some(Message::Text(Bytes::from(text.clone()))))
        );
        // The limit is on the inflated size.
        let mut small = Assembler::new(text.len() - 1);
        assert_eq!(
            small.push(compressed(true, OpCode::Text, &deflated)),
            Err(MessageError::TooBig)
        );
        let bad_utf8 = compress(b"ok\xff", 15);
        assert_eq!(
            a.push(compressed(true, OpCode::Text, &bad_utf8)),
            Err(MessageError::InvalidUtf8)
        );
    }

    #[test]
    fn joins_fragments_and_splits_utf8_across_them() {
        let mut a = Assembler::new(100);
        let euro = "€".as_bytes();
        assert_eq!(a.push(frame(false, OpCode::Text, &euro[..1])), Ok(None));
        assert_eq!(
            a.push(frame(false, OpCode::Continuation, &euro[1..])),
            Ok(None)
        );
        assert_eq!(
            a.push(frame(true, OpCode::Continuation, b"!")),
            Ok(Some(Message::Text(Bytes::from("€!"))))
        );
    }

    #[test]
    fn limits_the_whole_message_not_just_a_frame() {
        let mut a = Assembler::new(10);
        assert_eq!(a.push(frame(false, OpCode::Binary, b"123456")), Ok(None));
        assert_eq!(
            a.push(frame(true, OpCode::Continuation, b"123456")),
            Err(MessageError::TooBig)
        );
        assert_eq!(
            Assembler::new(3).push(frame(true, OpCode::Text, b"1234")),
            Err(MessageError::TooBig)
        );
    }

    #[test]
    fn fails_fast_on_invalid_utf8_and_on_truncated_text() {
        let mut a = Assembler::new(100);
        assert_eq!(
            a.push(frame(false, OpCode::Text, b"ok\xff")),
            Err(MessageError::InvalidUtf8)
        );
        let mut a = Assembler::new(100);
        assert_eq!(
            a.push(frame(false, OpCode::Text, &"€".as_bytes()[..2])),
            Ok(None)
        );
        assert_eq!(
            a.push(frame(true, OpCode::Continuation, b"")),
            Err(MessageError::InvalidUtf8)
        );
    }

    #[test]
    fn rejects_bad_sequences() {
        let mut a = Assembler::new(100);
        assert!(matches!(
            a.push(frame(true, OpCode::Continuation, b"x")),
            Err(MessageError::Protocol(_))
        ));
        assert_eq!(a.push(frame(false, OpCode::Text, b"x")), Ok(None));
        assert!(matches!(
            a.push(frame(true, OpCode::Text, b"y")),
            Err(MessageError::Protocol(_))
        ));
    }
}
