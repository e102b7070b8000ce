//! Placeholder network: this node is a single-member cluster, so there is nobody to talk to.
//! Every RPC fails with `Unreachable`. The replication work replaces this with a gRPC network.

use std::future::Future;
use std::io;

use openraft::RaftNetworkFactory;
use openraft::RaftNetworkV2;
use openraft::errors::RPCError;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::errors::Unreachable;
use openraft::network::RPCOption;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;

use super::types::Snapshot;
use super::types::SnapshotData;
use super::types::TypeConfig;
use super::types::Vote;

/// Network factory whose clients can reach no peer.
#[derive(Debug, Clone, Default)]
pub struct NoNetwork;

/// A client for a peer that is never reachable.
#[derive(Debug, Clone)]
pub struct UnreachablePeer {
    target: u64,
}

impl UnreachablePeer {
    fn unreachable(&self) -> Unreachable<TypeConfig> {
        let e = io::Error::new(
            io::ErrorKind::NotConnected,
            format!(
                "raft peer {} unreachable: peer networking is not implemented",
                self.target
            ),
        );
        Unreachable::new(&e)
    }
}

impl RaftNetworkFactory<TypeConfig> for NoNetwork {
    type Network = UnreachablePeer;

    async fn new_client(&mut self, target: u64, _node: &openraft::BasicNode) -> Self::Network {
        UnreachablePeer { target }
    }
}

impl RaftNetworkV2<TypeConfig> for UnreachablePeer {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn full_snapshot(
        &mut self,
        _vote: Vote,
        _snapshot: Snapshot,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        Err(StreamingError::Unreachable(self.unreachable()))
    }
}
