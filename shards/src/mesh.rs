//! The full mesh of typed, bounded channels between shards.
//!
//! Every shard can send a message of type `M` to every shard, itself included
//! (a message to self goes through a local channel, so callers never need a
//! special case). Channels are bounded: `send` waits for room, `try_send` hands
//! the message back when the peer is full, so back-pressure is explicit.
//!
//! Invariant: glommio numbers mesh peers by executor id, not by our shard index;
//! `peer_of_shard` translates, and it is filled before any shard is told the mesh
//! is ready.

use std::rc::Rc;

use glommio::channels::channel_mesh::{Receivers, Senders};
use glommio::channels::local_channel::{LocalReceiver, LocalSender};

use crate::ShardId;

/// Why a mesh message could not be delivered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MeshError {
    #[error("no shard {0} in a mesh of {1}")]
    UnknownShard(usize, usize),
    #[error("the channel to shard {0} is full")]
    Full(usize),
    #[error("the channel to shard {0} is closed")]
    Closed(usize),
}

/// The sending side of a shard's mesh connections.
pub struct Mesh<M: Send + 'static> {
    me: ShardId,
    senders: Senders<M>,
    peer_of_shard: Rc<[usize]>,
    to_self: LocalSender<M>,
}

impl<M: Send + 'static> Mesh<M> {
    pub(crate) fn new(
        me: ShardId,
        senders: Senders<M>,
        peer_of_shard: Rc<[usize]>,
        to_self: LocalSender<M>,
    ) -> Self {
        Self {
            me,
            senders,
            peer_of_shard,
            to_self,
        }
    }

    /// Number of shards in the mesh.
    pub fn shard_count(&self) -> usize {
        self.peer_of_shard.len()
    }

    /// This shard's id.
    pub fn me(&self) -> ShardId {
        self.me
    }

    /// Sends `msg` to shard `to`, waiting while its channel is full.
    pub async fn send(&self, to: ShardId, msg: M) -> Result<(), (MeshError, M)> {
        if to == self.me {
            return self
                .to_self
                .send(msg)
                .await
                .map_err(|err| classify(to, err));
        }
        match self.peer(to) {
            Ok(peer) => self
                .senders
                .send_to(peer, msg)
                .await
                .map_err(|err| classify(to, err)),
            Err(err) => Err((err, msg)),
        }
    }

    /// Sends `msg` to shard `to` without waiting; hands it back if the channel is
    /// full or closed.
    pub fn try_send(&self, to: ShardId, msg: M) -> Result<(), (MeshError, M)> {
        if to == self.me {
            return self.to_self.try_send(msg).map_err(|err| classify(to, err));
        }
        match self.peer(to) {
            Ok(peer) => self
                .senders
                .try_send_to(peer, msg)
                .map_err(|err| classify(to, err)),
            Err(err) => Err((err, msg)),
        }
    }

    fn peer(&self, to: ShardId) -> Result<usize, MeshError> {
        self.peer_of_shard
            .get(to.0)
            .copied()
            .ok_or(MeshError::UnknownShard(to.0, self.peer_of_shard.len()))
    }
}

/// Turns glommio's channel error back into the undelivered message and a reason.
fn classify<M>(to: ShardId, err: glommio::GlommioError<M>) -> (MeshError, M) {
    match err {
        glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(msg)) => {
            (MeshError::Full(to.0), msg)
        }
        glommio::GlommioError::Closed(glommio::ResourceType::Channel(msg)) => {
            (MeshError::Closed(to.0), msg)
        }
        other => unreachable!("a channel send failed without returning the message: {other}"),
    }
}

/// The receiving side, consumed when the shard starts its inbox.
pub(crate) struct Inbox<M: Send + 'static> {
    pub(crate) receivers: Receivers<M>,
    pub(crate) from_self: LocalReceiver<M>,
    pub(crate) shard_of_peer: Rc<[usize]>,
}

impl<M: Send + 'static> Inbox<M> {
    /// Spawns one task per incoming channel; each hands messages to `handler`
    /// with the sender's shard id, in the order that sender sent them.
    pub(crate) fn spawn<H>(mut self, handler: Rc<H>)
    where
        H: Fn(ShardId, M) + 'static,
    {
        let me = self.receivers.peer_id();
        for (peer, receiver) in self.receivers.streams() {
            let from = ShardId(self.shard_of_peer[peer]);
            let handler = handler.clone();
            glommio::spawn_local(async move {
                while let Some(msg) = receiver.recv().await {
                    handler(from, msg);
                }
            })
            .detach();
        }
        let from = ShardId(self.shard_of_peer[me]);
        let from_self = self.from_self;
        glommio::spawn_local(async move {
            while let Some(msg) = from_self.recv().await {
                handler(from, msg);
            }
        })
        .detach();
    }
}
