//! WebSocket frames on the wire (RFC 6455 §5), as the relay sees them.
//!
//! The relay does not decode and re-encode messages: a client's frames are masked, which is what
//! a bot expects of its client, and a bot's frames are not, which is what a client expects of its
//! server, so both go on byte for byte. [`FrameReader`] follows the frame headers of one side's
//! byte stream, chunk by chunk, holding a few dozen bytes of state: enough to check each frame
//! (masking, reserved bits, opcodes, control frame rules, the size limit), to count the data, to
//! see a close frame and its code, and to know where a frame ends, which is the only place the
//! broker may put a frame of its own (a ping, a close) into the stream.

/// Opcodes (RFC 6455 §5.2).
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// Who sends the frames read: a client masks every frame, a server none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Client,
    Server,
}

/// Why a frame is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// Answered with close code 1002.
    Protocol(&'static str),
    /// A frame, or a fragmented message, over the size limit: close code 1009.
    TooBig,
}

/// What a frame brought, reported as the reader meets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A data frame begins (text, binary or continuation), with its payload length.
    Data {
        opcode: u8,
        len: u64,
    },
    /// A close frame ended; its status code, if it carried one.
    Close {
        code: Option<u16>,
    },
    Ping,
    Pong,
}

/// A refused frame: the violation, and where in the chunk the frame began (`None`: it began in
/// an earlier chunk, so part of its header has gone on already).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub violation: Violation,
    pub at: Option<usize>,
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
    /// Bytes the header takes on the wire.
    pub size: usize,
}

/// Parses a frame header from the start of `bytes`: `Ok(None)` while it is incomplete. Checks
/// what a header alone shows: reserved bits, opcode, masking for `sender`, control frame rules.
pub fn parse_header(bytes: &[u8], sender: Sender) -> Result<Option<Header>, Violation> {
    let [b0, b1, ..] = *bytes else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(Violation::Protocol("reserved bits set"));
    }
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
    if !matches!(opcode, 0x0..=0x2 | 0x8..=0xA) {
        return Err(Violation::Protocol("unknown opcode"));
    }
    let masked = b1 & 0x80 != 0;
    match (sender, masked) {
        (Sender::Client, false) => return Err(Violation::Protocol("client frame not masked")),
        (Sender::Server, true) => return Err(Violation::Protocol("server frame masked")),
        _ => {}
    }
    let (len_size, short) = match b1 & 0x7F {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(u64::from(n))),
    };
    let size = 2 + len_size + if masked { 4 } else { 0 };
    if bytes.len() < size {
        return Ok(None);
    }
    let len = match short {
        Some(n) => n,
        None => {
            let mut be = [0u8; 8];
            be[8 - len_size..].copy_from_slice(&bytes[2..2 + len_size]);
            u64::from_be_bytes(be)
        }
    };
    if len >> 63 != 0 {
        return Err(Violation::Protocol("frame length out of range"));
    }
    if opcode >= opcode::CLOSE && (!fin || len > 125) {
        return Err(Violation::Protocol("control frame fragmented or over 125 bytes"));
    }
    if opcode == opcode::CLOSE && len == 1 {
        return Err(Violation::Protocol("close frame with a one-byte payload"));
    }
    let mask = masked.then(|| {
        let at = 2 + len_size;
        [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]
    });
    Ok(Some(Header { fin, opcode, mask, len, size }))
}

/// Follows one side's frames across the chunks its stream arrives in.
#[derive(Debug, Clone)]
pub struct FrameReader {
    sender: Sender,
    max_message: u64,
    /// Header bytes received so far (a header is at most 14 bytes).
    head: [u8; 14],
    head_len: u8,
    /// The current frame, once its header is complete.
    opcode: u8,
    mask: [u8; 4],
    /// Payload bytes of the current frame still to come, and how many came.
    remaining: u64,
    seen: u64,
    /// The first two payload bytes of a close frame, unmasked: its status code.
    close_code: [u8; 2],
    /// A fragmented data message is open, and its length so far.
    fragmented: bool,
    message_len: u64,
}

impl FrameReader {
    /// A reader of `sender`'s frames, refusing data messages over `max_message` bytes.
    pub fn new(sender: Sender, max_message: usize) -> Self {
        Self {
            sender,
            max_message: max_message as u64,
            head: [0; 14],
            head_len: 0,
            opcode: 0,
            mask: [0; 4],
            remaining: 0,
            seen: 0,
            close_code: [0; 2],
            fragmented: false,
            message_len: 0,
        }
    }

    /// Whether everything read so far ends at a frame boundary: a frame of the broker's own may
    /// go into the stream here.
    pub fn at_boundary(&self) -> bool {
        self.head_len == 0 && self.remaining == 0
    }

    /// Forgets the frame begun: after a refused frame none of which went on, the stream passed
    /// on ends between frames.
    pub fn abandon_frame(&mut self) {
        self.head_len = 0;
        self.remaining = 0;
    }

    /// Reads the next chunk of the stream, reporting each frame's events. On a refused frame,
    /// nothing from that frame on may be passed on; the reader must not be fed again.
    pub fn feed(&mut self, chunk: &[u8], on: &mut impl FnMut(Event)) -> Result<(), Refused> {
        let mut at = 0;
        // Where the current header began in this chunk (`None`: in an earlier one).
        let mut head_start = (self.head_len == 0).then_some(0);
        while at < chunk.len() {
            if self.remaining > 0 {
                let take =
                    (chunk.len() - at).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                if self.opcode == opcode::CLOSE && self.seen < 2 {
                    for (i, byte) in chunk[at..at + take.min(2)].iter().enumerate() {
                        let pos = self.seen as usize + i;
                        if pos < 2 {
                            self.close_code[pos] = byte ^ self.mask[pos % 4];
                        }
                    }
                }
                self.seen += take as u64;
                self.remaining -= take as u64;
                at += take;
                if self.remaining == 0 {
                    self.frame_done(on);
                }
                continue;
            }
            if self.head_len == 0 {
                head_start = Some(at);
            }
            self.head[usize::from(self.head_len)] = chunk[at];
            self.head_len += 1;
            at += 1;
            let refused = |violation| Refused { violation, at: head_start };
            let header = match parse_header(&self.head[..usize::from(self.head_len)], self.sender) {
                Ok(Some(header)) => header,
                Ok(None) => continue,
                Err(violation) => return Err(refused(violation)),
            };
            self.head_len = 0;
            self.begin(header, on).map_err(refused)?;
            if self.remaining == 0 {
                self.frame_done(on);
            }
        }
        Ok(())
    }

    /// Checks a complete header against the message in progress and starts its frame.
    fn begin(&mut self, header: Header, on: &mut impl FnMut(Event)) -> Result<(), Violation> {
        let Header { fin, opcode, mask, len, .. } = header;
        if opcode < opcode::CLOSE {
            match (opcode, self.fragmented) {
                (opcode::CONTINUATION, false) => {
                    return Err(Violation::Protocol("continuation frame outside a message"));
                }
                (opcode::TEXT | opcode::BINARY, true) => {
                    return Err(Violation::Protocol("new message inside a fragmented one"));
                }
                (opcode::CONTINUATION, true) => self.message_len += len,
                _ => self.message_len = len,
            }
            if self.message_len > self.max_message {
                return Err(Violation::TooBig);
            }
            self.fragmented = !fin;
            on(Event::Data { opcode, len });
        }
        self.opcode = opcode;
        self.mask = mask.unwrap_or_default();
        self.remaining = len;
        self.seen = 0;
        Ok(())
    }

    fn frame_done(&mut self, on: &mut impl FnMut(Event)) {
        match self.opcode {
            opcode::CLOSE => {
                let code = (self.seen >= 2).then(|| u16::from_be_bytes(self.close_code));
                on(Event::Close { code });
            }
            opcode::PING => on(Event::Ping),
            opcode::PONG => on(Event::Pong),
            _ => {}
        }
    }
}

/// A whole frame, its payload unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// Decodes the frame at the start of `bytes`, with the bytes it takes; `Ok(None)` while it is
/// incomplete. For reading a few opening messages before the relay starts.
pub fn decode(
    bytes: &[u8],
    sender: Sender,
    max_len: usize,
) -> Result<Option<(Frame, usize)>, Violation> {
    let Some(header) = parse_header(bytes, sender)? else { return Ok(None) };
    if header.len > max_len as u64 {
        return Err(Violation::TooBig);
    }
    let end = header.size + header.len as usize;
    if bytes.len() < end {
        return Ok(None);
    }
    let mut payload = bytes[header.size..end].to_vec();
    if let Some(mask) = header.mask {
        apply_mask(&mut payload, mask);
    }
    Ok(Some((Frame { fin: header.fin, opcode: header.opcode, payload }, end)))
}

fn apply_mask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

/// Encodes a frame the broker sends of its own: masked (with a fresh random key) when it goes
/// to a server, plain when it goes to a client.
pub fn encode(opcode: u8, payload: &[u8], to: Sender) -> Vec<u8> {
    let masked = to == Sender::Server;
    let mut frame = Vec::with_capacity(payload.len() + 14);
    frame.push(0x80 | opcode);
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => frame.push(mask_bit | n as u8),
        n @ 126..=0xFFFF => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let start = frame.len() + if masked { 4 } else { 0 };
    if masked {
        let mask: [u8; 4] = rand::random();
        frame.extend_from_slice(&mask);
        frame.extend_from_slice(payload);
        apply_mask(&mut frame[start..], mask);
    } else {
        frame.extend_from_slice(payload);
    }
    frame
}

/// A close frame with `code` and `reason` (cut to the 123 bytes a close frame can carry, at a
/// character boundary).
pub fn close_frame(code: u16, reason: &str, to: Sender) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(opcode::CLOSE, &payload, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(reader: &mut FrameReader, chunks: &[&[u8]]) -> (Vec<Event>, Option<Refused>) {
        let mut seen = Vec::new();
        for chunk in chunks {
            if let Err(refused) = reader.feed(chunk, &mut |e| seen.push(e)) {
                return (seen, Some(refused));
            }
        }
        (seen, None)
    }

    fn stream() -> Vec<u8> {
        let mut bytes = encode(opcode::TEXT, b"hello", Sender::Server);
        bytes.extend(encode(opcode::PING, b"", Sender::Server));
        bytes.extend(encode(opcode::BINARY, &[7; 300], Sender::Server));
        bytes.extend(encode(opcode::BINARY, &[1; 70_000], Sender::Server));
        bytes.extend(close_frame(1000, "bye", Sender::Server));
        bytes
    }

    #[test]
    fn every_split_of_a_stream_reads_alike() {
        let bytes = stream();
        let whole = events(&mut FrameReader::new(Sender::Client, 1 << 20), &[&bytes]);
        assert_eq!(
            whole.0,
            [
                Event::Data { opcode: 1, len: 5 },
                Event::Ping,
                Event::Data { opcode: 2, len: 300 },
                Event::Data { opcode: 2, len: 70_000 },
                Event::Close { code: Some(1000) },
            ]
        );
        assert_eq!(whole.1, None);
        for split in (0..bytes.len()).step_by(7).chain(bytes.len() - 20..bytes.len()) {
            let mut reader = FrameReader::new(Sender::Client, 1 << 20);
            let parts = events(&mut reader, &[&bytes[..split], &bytes[split..]]);
            assert_eq!(parts, whole, "split at {split}");
            assert!(reader.at_boundary());
        }
    }

    #[test]
    fn a_masked_close_code_is_read_through_the_mask() {
        let frame = close_frame(4000, "terminated", Sender::Server);
        assert_eq!(frame[1] & 0x80, 0x80, "frames to a server are masked");
        for split in 1..frame.len() {
            let mut reader = FrameReader::new(Sender::Client, 1024);
            let read = events(&mut reader, &[&frame[..split], &frame[split..]]);
            assert_eq!(read.0, [Event::Close { code: Some(4000) }], "split at {split}");
        }
        let decoded = decode(&frame, Sender::Client, 125).unwrap().unwrap();
        assert_eq!(decoded.0.payload, b"\x0f\xa0terminated");
        assert_eq!(decoded.1, frame.len());
    }

    #[test]
    fn refusals_say_where_the_frame_began() {
        let mut bytes = encode(opcode::TEXT, b"fine", Sender::Server);
        let good = bytes.len();
        bytes.extend(encode(opcode::BINARY, &[0; 2000], Sender::Server));
        let mut reader = FrameReader::new(Sender::Client, 1000);
        let (seen, refused) = events(&mut reader, &[&bytes]);
        assert_eq!(seen, [Event::Data { opcode: 1, len: 4 }]);
        assert_eq!(refused, Some(Refused { violation: Violation::TooBig, at: Some(good) }));

        // A header split across chunks began in the earlier one.
        let mut reader = FrameReader::new(Sender::Client, 1000);
        let (_, refused) = events(&mut reader, &[&bytes[..good + 1], &bytes[good + 1..]]);
        assert_eq!(refused, Some(Refused { violation: Violation::TooBig, at: None }));
    }

    #[test]
    fn protocol_violations_are_refused() {
        let client = encode(opcode::TEXT, b"x", Sender::Server);
        let server = encode(opcode::TEXT, b"x", Sender::Client);
        let cases: Vec<(Sender, Vec<u8>)> = vec![
            (Sender::Client, server.clone()),
            (Sender::Server, client.clone()),
            (Sender::Client, [&[client[0] | 0x40], &client[1..]].concat()),
            (Sender::Client, [&[0x83], &client[1..]].concat()),
            (Sender::Client, [&[0x80], &client[1..]].concat()),
            (Sender::Client, [&[0x09], &client[1..]].concat()),
            (Sender::Client, [&[0x01], &client[1..], &client[..]].concat()),
            (Sender::Server, encode(opcode::PING, &[0; 126], Sender::Client)),
            (Sender::Server, vec![0x88, 0x01, 0x03]),
            (Sender::Server, vec![0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        ];
        for (i, (sender, bytes)) in cases.iter().enumerate() {
            let mut reader = FrameReader::new(*sender, 1 << 20);
            let refused = events(&mut reader, &[bytes]).1.map(|r| r.violation);
            assert!(matches!(refused, Some(Violation::Protocol(_))), "case {i}: {refused:?}");
        }
    }

    #[test]
    fn fragments_count_toward_one_message() {
        let mut bytes = vec![0x01, 0x83, 0, 0, 0, 0, b'a', b'b', b'c'];
        bytes.extend([0x00, 0x83, 0, 0, 0, 0, b'd', b'e', b'f']);
        bytes.extend([0x89, 0x80, 0, 0, 0, 0]);
        bytes.extend([0x80, 0x82, 0, 0, 0, 0, b'g', b'h']);
        let mut reader = FrameReader::new(Sender::Client, 7);
        let (seen, refused) = events(&mut reader, &[&bytes]);
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(refused.map(|r| r.violation), Some(Violation::TooBig));
        let mut reader = FrameReader::new(Sender::Client, 8);
        assert_eq!(events(&mut reader, &[&bytes]).1, None);
    }

    #[test]
    fn close_reasons_are_cut_at_a_character_boundary() {
        let frame = close_frame(1000, &"é".repeat(100), Sender::Client);
        let (decoded, _) = decode(&frame, Sender::Server, 125).unwrap().unwrap();
        assert_eq!(decoded.payload.len(), 2 + 122);
        assert!(std::str::from_utf8(&decoded.payload[2..]).is_ok());
    }
}
