//! Setup writes, before a window opens: keys the timed requests then read or contend on.

use kv_client::{Kv, PutOptions, Txn, TxnOp};

use crate::error::{During, Error};

/// Puts per setup transaction (etcd's default `--max-txn-ops` is 128).
const PUTS_PER_TXN: usize = 100;

/// Puts `items` one at a time, in order; returns the revision of each put.
///
/// One at a time, as the older raw-tonic `kv-load` did: etcd's later gets cost it measurably
/// more server CPU (about a quarter, 3.4.23) when the keys were written 64 at a time instead,
/// so a concurrent preload would make the read workloads measure the preload.
pub(crate) async fn one_by_one(kv: &Kv, items: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<i64>, Error> {
    let mut revisions = Vec::with_capacity(items.len());
    for (key, value) in items {
        let put = kv
            .put(key, value.clone(), PutOptions::new())
            .await
            .during("preload")?;
        revisions.push(put.revision);
    }
    Ok(revisions)
}

/// Puts `items` in transactions of `PUTS_PER_TXN`, one transaction at a time, in order (the
/// same layout on the server whatever the run's concurrency).
pub(crate) async fn in_txns(kv: &Kv, items: &[(Vec<u8>, Vec<u8>)]) -> Result<(), Error> {
    for chunk in items.chunks(PUTS_PER_TXN) {
        let txn = Txn::new().and_then(
            chunk
                .iter()
                .map(|(k, v)| TxnOp::put(k.clone(), v.clone(), PutOptions::new())),
        );
        kv.txn(txn).await.during("preload")?;
    }
    Ok(())
}
