//! Reassembles WebSocket data frames into messages, enforcing the message size limit across
//! fragments and validating UTF-8 as text arrives (failing fast, as RFC 6455 §8.1 asks).

use bytes::{Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode};

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
    /// 1002
    Protocol(&'static str),
}

struct Partial {
    text: bool,
    data: BytesMut,
    /// Prefix of `data` known to be valid UTF-8 (text only).
    valid: usize,
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
    pub fn push(&mut self, frame: Frame<'_>) -> Result<Option<Message>, MessageError> {
        match frame.opcode {
            OpCode::Text | OpCode::Binary => {
                if self.partial.is_some() {
                    return Err(MessageError::Protocol(
                        "new message inside a fragmented one",
                    ));
                }
                let text = frame.opcode == OpCode::Text;
                if frame.payload.len() > self.max_size {
                    return Err(MessageError::TooBig);
                }
                if frame.fin {
                    let data = payload_bytes(frame);
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
                    data: BytesMut::from(&frame.payload[..]),
                    valid: 0,
                };
                check_utf8(&mut partial, false)?;
                self.partial = Some(partial);
                Ok(None)
            }
            OpCode::Continuation => {
                let Some(partial) = self.partial.as_mut() else {
                    return Err(MessageError::Protocol("continuation without a message"));
                };
                if partial.data.len() + frame.payload.len() > self.max_size {
                    return Err(MessageError::TooBig);
                }
                partial.data.extend_from_slice(&frame.payload);
                check_utf8(partial, frame.fin)?;
                if !frame.fin {
                    return Ok(None);
                }
                let partial = self.partial.take().expect("checked above");
                let data = partial.data.freeze();
                Ok(Some(if partial.text {
                    Message::Text(data)
                } else {
                    Message::Binary(data)
                }))
            }
            _ => Err(MessageError::Protocol("not a data frame")),
        }
    }
}

fn payload_bytes(frame: Frame<'_>) -> Bytes {
    match frame.payload {
        fastwebsockets::Payload::Bytes(b) => b.freeze(),
        fastwebsockets::Payload::Owned(v) => Bytes::from(v),
        other => Bytes::copy_from_slice(&other),
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
    use fastwebsockets::Payload;

    fn frame(fin: bool, opcode: OpCode, data: &[u8]) -> Frame<'static> {
        Frame::new(fin, opcode, None, Payload::Owned(data.to_vec()))
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
