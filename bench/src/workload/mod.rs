//! The workloads, one module per family. Each sets up what it needs (not timed), opens a
//! [`crate::load::Window`], drives its requests through kv-client, closes the window, then
//! checks what the server answered and cleans up (not timed either).

mod cas;
mod get;
mod lease;
mod preload;
mod put;
mod range;
mod watch;

use std::fmt;
use std::str::FromStr;

use crate::error::Error;
use crate::report::WorkloadResult;
use crate::run::Context;
use crate::settings::Settings;

/// A step between the keys one worker uses, prime so that the workers spread over the keys.
pub(crate) const KEY_STRIDE: usize = 7919;

/// One benchmark workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Workload {
    /// Puts one at a time.
    PutSeq,
    /// Puts with `in_flight` concurrent requests.
    Put,
    /// Linearizable gets of preloaded keys.
    Get,
    /// Serializable gets of preloaded keys.
    GetSerializable,
    /// Compare-and-swap transactions (compare mod revision, then put) on a few hot keys.
    Cas,
    /// Many watchers of one prefix, one writer.
    WatchFanout,
    /// Many watchers each of its own key, several writers.
    WatchDistinct,
    /// Lease grants.
    LeaseGrant,
    /// Keep-alives of many leases.
    LeaseKeepalive,
    /// Lease revokes.
    LeaseRevoke,
    /// Full reads of a large prefix.
    Range,
}

impl Workload {
    /// Every workload, in the order `all` runs them.
    pub const ALL: [Workload; 11] = [
        Workload::PutSeq,
        Workload::Put,
        Workload::Get,
        Workload::GetSerializable,
        Workload::Cas,
        Workload::WatchFanout,
        Workload::WatchDistinct,
        Workload::LeaseGrant,
        Workload::LeaseKeepalive,
        Workload::LeaseRevoke,
        Workload::Range,
    ];

    /// Its name on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Workload::PutSeq => "put-seq",
            Workload::Put => "put",
            Workload::Get => "get",
            Workload::GetSerializable => "get-serializable",
            Workload::Cas => "cas",
            Workload::WatchFanout => "watch-fanout",
            Workload::WatchDistinct => "watch-distinct",
            Workload::LeaseGrant => "lease-grant",
            Workload::LeaseKeepalive => "lease-keepalive",
            Workload::LeaseRevoke => "lease-revoke",
            Workload::Range => "range",
        }
    }

    /// What its operations count.
    pub fn unit(self) -> &'static str {
        match self {
            Workload::PutSeq | Workload::Put => "puts",
            Workload::Get | Workload::GetSerializable => "gets",
            Workload::Cas => "commits",
            Workload::WatchFanout | Workload::WatchDistinct => "events",
            Workload::LeaseGrant => "grants",
            Workload::LeaseKeepalive => "keep-alives",
            Workload::LeaseRevoke => "revokes",
            Workload::Range => "reads",
        }
    }

    /// Requests it keeps in flight: one for `put-seq`; one per connection for `range`, whose
    /// answers are megabytes each; one per writer for the watch workloads; `--in-flight` for
    /// the rest.
    pub fn in_flight(self, s: &Settings) -> usize {
        match self {
            Workload::PutSeq | Workload::WatchFanout => 1,
            Workload::WatchDistinct => s.watch_writers,
            Workload::Range => s.in_flight.min(s.connections),
            _ => s.in_flight,
        }
    }

    /// Parses `all` or a comma-separated list of names.
    pub fn parse_list(text: &str) -> Result<Vec<Workload>, Error> {
        if text.trim() == "all" {
            return Ok(Workload::ALL.to_vec());
        }
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<_>, _>>()
            .and_then(|list| {
                if list.is_empty() {
                    Err(Error::Settings("no workload named".into()))
                } else {
                    Ok(list)
                }
            })
    }

    pub(crate) async fn run(self, ctx: &Context<'_>) -> Result<WorkloadResult, Error> {
        let measured = match self {
            Workload::PutSeq | Workload::Put => put::run(ctx).await?,
            Workload::Get | Workload::GetSerializable => get::run(ctx).await?,
            Workload::Cas => cas::run(ctx).await?,
            Workload::WatchFanout => watch::fanout(ctx).await?,
            Workload::WatchDistinct => watch::distinct(ctx).await?,
            Workload::LeaseGrant => lease::grant(ctx).await?,
            Workload::LeaseKeepalive => lease::keepalive(ctx).await?,
            Workload::LeaseRevoke => lease::revoke(ctx).await?,
            Workload::Range => range::run(ctx).await?,
        };
        Ok(ctx.result(measured))
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
                Error::Settings(format!(
                    "unknown workload {s:?} (known: {}, or all)",
                    names.join(", ")
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_lists_parse() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>().ok(), Some(w));
        }
        assert_eq!(
            Workload::parse_list("put, cas,range").ok(),
            Some(vec![Workload::Put, Workload::Cas, Workload::Range])
        );
        assert_eq!(
            Workload::parse_list("all").ok(),
            Some(Workload::ALL.to_vec())
        );
        assert!(Workload::parse_list("put,nope").is_err());
        assert!(Workload::parse_list("").is_err());
    }
}
