//! What masters published, kept across broker restarts (redb).

use std::{collections::HashMap, path::Path};

use anyhow::Context as _;
use pvc_proto::{ClusterId, PublicKey, SignedPolicy, SignedRecord, SignedRevocations};
use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::Cluster;

const CLUSTERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("clusters");

#[derive(Serialize, Deserialize)]
struct Stored {
    master_key: PublicKey,
    records: Vec<SignedRecord>,
    revocations: Option<SignedRevocations>,
    policy: Option<SignedPolicy>,
}

pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let db = Database::create(path)
            .with_context(|| format!("cannot open broker state {}", path.display()))?;
        Ok(Self { db })
    }

    pub(crate) fn save(&self, id: &ClusterId, c: &Cluster) -> anyhow::Result<()> {
        let stored = Stored {
            master_key: c.master_key,
            records: c.records.values().map(|(_, s)| s.clone()).collect(),
            revocations: c.revocations.as_ref().map(|(_, s)| s.clone()),
            policy: c.policy.as_ref().map(|(_, s)| s.clone()),
        };
        let bytes = postcard::to_stdvec(&stored)?;
        let tx = self.db.begin_write()?;
        tx.open_table(CLUSTERS)?.insert(&id.0[..], &bytes[..])?;
        tx.commit()?;
        Ok(())
    }

    /// Everything stored, checked again: a tampered file yields nothing it
    /// would not have accepted from a master.
    pub(crate) fn load(&self) -> anyhow::Result<HashMap<ClusterId, Cluster>> {
        let mut out = HashMap::new();
        let tx = self.db.begin_read()?;
        let table = match tx.open_table(CLUSTERS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        for entry in table.iter()? {
            let (_, v) = entry?;
            let stored: Stored = postcard::from_bytes(v.value()).context("corrupt broker state")?;
            let id = ClusterId::of(&stored.master_key);
            let mut c = Cluster::new(stored.master_key);
            for s in stored.records {
                if let Ok(r) = s.verify(&stored.master_key) {
                    c.records.insert(r.host_key, (r, s));
                }
            }
            c.revocations = stored
                .revocations
                .and_then(|s| Some((s.verify(&stored.master_key).ok()?, s)));
            c.policy = stored
                .policy
                .and_then(|s| Some((s.verify(&stored.master_key).ok()?, s)));
            out.insert(id, c);
        }
        Ok(out)
    }
}
