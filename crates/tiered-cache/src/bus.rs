//! Messages between instances on the store's bus.

use serde::{Deserialize, Serialize};

/// Most keys named in one message; longer lists are split.
pub(crate) const MAX_KEYS_PER_MESSAGE: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Body {
    /// Drop these keys (their `Display` form) from process memory.
    Keys(Vec<String>),
    /// The namespace moved to this generation: drop everything older.
    Generation(u64),
    /// A value for this L2 key was written by the instance that held its lease.
    Filled(String),
    /// The lease holder's load of this L2 key failed.
    Failed(String),
    /// A tag of the caches under key prefix `prefix` moved to `generation`: entries with the
    /// tag loaded before it are stale, in every namespace.
    Tag {
        prefix: String,
        name: String,
        generation: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Message {
    pub(crate) version: u8,
    pub(crate) origin: u64,
    pub(crate) namespace: String,
    pub(crate) body: Body,
}

impl Message {
    pub(crate) fn new(origin: u64, namespace: &str, body: Body) -> Self {
        Self {
            version: 1,
            origin,
            namespace: namespace.to_owned(),
            body,
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        // Encoding a struct of strings and integers into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        postcard::from_bytes::<Self>(bytes)
            .ok()
            .filter(|m| m.version == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let m = Message::new(7, "product", Body::Keys(vec!["1".into(), "2".into()]));
        assert_eq!(Message::decode(&m.encode()), Some(m));
        let tag = Body::Tag {
            prefix: "shop:".into(),
            name: "category:7".into(),
            generation: 9,
        };
        let m = Message::new(7, "product", tag);
        assert_eq!(Message::decode(&m.encode()), Some(m));
        assert_eq!(Message::decode(b"\xff\xff\xff"), None);
        assert_eq!(Message::decode(&[]), None);
    }
}
