//! The relay's frame reader (`wire::FrameReader`): whatever bytes a client or a bot sends, in
//! whatever chunks the socket delivers them, the reader never panics, reads the same frames
//! however the stream is split, and agrees frame by frame with the whole-frame decoder the
//! telephony opening uses: the same frames, the same close codes, the same refusals.
//!
//! The first byte picks the sender (client or server) and where the stream is split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use session_broker::wire::{self, Event, FrameReader, Refused, Sender, opcode};

const MAX: usize = 4096;

fn read(sender: Sender, chunks: &[&[u8]]) -> (Vec<Event>, Option<Refused>, bool) {
    let mut reader = FrameReader::new(sender, MAX);
    let mut events = Vec::new();
    let mut offset = 0;
    for chunk in chunks {
        if let Err(mut refused) = reader.feed(chunk, &mut |e| events.push(e)) {
            if let Some(at) = refused.at {
                assert!(at < chunk.len(), "refusal beyond its chunk");
                refused.at = Some(offset + at);
            }
            return (events, Some(refused), false);
        }
        offset += chunk.len();
    }
    (events, None, reader.at_boundary())
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, stream)) = data.split_first() else { return };
    let sender = if pick & 1 == 0 { Sender::Client } else { Sender::Server };
    let split = usize::from(pick >> 1) % (stream.len() + 1);

    let whole = read(sender, &[stream]);
    let (head, tail) = stream.split_at(split);
    let parts = read(sender, &[head, tail]);
    // A refusal found in the second chunk may only say "began earlier" when the frame did.
    let same_place = |a: Option<Refused>, b: Option<Refused>| match (a, b) {
        (Some(a), Some(b)) => a.violation == b.violation && (b.at.is_none() || a.at == b.at),
        (a, b) => a == b,
    };
    assert_eq!(whole.0, parts.0, "events depend on the split");
    assert!(same_place(whole.1, parts.1), "refusals depend on the split");
    assert_eq!(whole.2, parts.2);

    // Frame by frame with the whole-frame decoder (which checks frames, not messages): what
    // the reader took, the decoder takes too, frame for frame.
    if whole.1.is_none() {
        let mut at = 0;
        let mut frames = Vec::new();
        while let Some((frame, size)) =
            wire::decode(&stream[at..], sender, MAX).expect("the decoder refused what the reader took")
        {
            at += size;
            frames.push(frame);
        }
        let data: Vec<(u8, u64)> = whole
            .0
            .iter()
            .filter_map(|e| match e {
                Event::Data { opcode, len } => Some((*opcode, *len)),
                _ => None,
            })
            .collect();
        let decoded: Vec<(u8, u64)> = frames
            .iter()
            .filter(|f| f.opcode < opcode::CLOSE)
            .map(|f| (f.opcode, f.payload.len() as u64))
            .collect();
        // The reader announces a data frame at its header, the decoder returns it whole.
        assert!(data.starts_with(&decoded) && data.len() - decoded.len() <= 1, "frames differ");
        let closes = whole.0.iter().filter_map(|e| match e {
            Event::Close { code } => Some(*code),
            _ => None,
        });
        let decoded_closes = frames.iter().filter(|f| f.opcode == opcode::CLOSE).map(|f| {
            (f.payload.len() >= 2).then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]))
        });
        assert!(closes.eq(decoded_closes), "close codes differ");
    }
});
