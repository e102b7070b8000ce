//! Raft type configuration and the opaque command/response payloads.
//!
//! The Raft layer does not know the engine's command format: a proposal is an opaque byte
//! string ([`Command`]) that the [`Applier`](super::Applier) decodes (the engine encodes its
//! commands as protobuf), and the applier's answer is an opaque byte string ([`Response`]).
//! Both serialize as serde *bytes* (`serialize_bytes`), so postcard stores them as a
//! length-prefixed blob instead of a sequence of `u8` elements.

use std::fmt;

use serde::Deserialize;
use serde::Deserializer;
use serde::Serialize;
use serde::Serializer;

openraft::declare_raft_types!(
    /// The openraft type configuration of the KV server.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
);

/// Log entry type stored by the log store.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// Log id (committed leader id + index).
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// Vote type.
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// The leader of a term (term and node id); log entries carry the one that appended them.
pub type LeaderId = openraft::type_config::alias::CommittedLeaderIdOf<TypeConfig>;
/// Membership as stored in the state machine.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// Snapshot payload handed around by openraft (kept in memory for now).
pub type SnapshotData = std::io::Cursor<Vec<u8>>;
/// Snapshot with our payload type.
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotData>;

/// An opaque, engine-encoded command proposed through Raft.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Command(pub Vec<u8>);

/// An opaque, engine-encoded result of applying one [`Command`].
///
/// Blank and membership entries produce an empty response, which is never sent to a client.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Response(pub Vec<u8>);

macro_rules! bytes_newtype {
    ($t:ident) => {
        impl From<Vec<u8>> for $t {
            fn from(v: Vec<u8>) -> Self {
                Self(v)
            }
        }

        impl From<$t> for Vec<u8> {
            fn from(v: $t) -> Self {
                v.0
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "({} bytes)"), self.0.len())
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "({} bytes)"), self.0.len())
            }
        }

        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_byte_buf(BytesVisitor).map($t)
            }
        }
    };
}

bytes_newtype!(Command);
bytes_newtype!(Response);

/// Accepts serde bytes, byte buffers, and (for self-describing formats such as JSON, which
/// encode bytes as an array of numbers) sequences of `u8`.
struct BytesVisitor;

impl<'de> serde::de::Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raft_command_serde_roundtrip() {
        let c = Command(vec![1, 2, 3, 255]);
        let b = postcard::to_allocvec(&c).unwrap();
        // length prefix + raw bytes
        assert_eq!(b, vec![4, 1, 2, 3, 255]);
        assert_eq!(postcard::from_bytes::<Command>(&b).unwrap(), c);

        let j = serde_json::to_string(&Response(vec![7, 8])).unwrap();
        assert_eq!(
            serde_json::from_str::<Response>(&j).unwrap(),
            Response(vec![7, 8])
        );
    }
}
