//! The cluster's master (paper §4.3): the administrator's key pair, the
//! registry of admitted hosts, and the signed documents published to the
//! brokers. Only the master can admit a host; brokers and members check its
//! signatures.
//!
//! The registry is an embedded database (redb) next to the master key, so
//! that serials, names and virtual addresses stay unique across restarts.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use pvc_proto::{
    AgentMessage, BrokerMessage, ClusterId, GlobalPolicy, MembershipRecord, PolicyRule, PortRange,
    PublicKey, Publication, Revocations, Selector, SignedPolicy, SignedRecord, SignedRevocations,
    unix_now, valid_name, valid_virtual_address,
};
use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::Deserialize;

use super::keys::KeyPair;
use crate::broker_client;

const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
const DOCS: TableDefinition<&str, &[u8]> = TableDefinition::new("documents");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

pub const DEFAULT_DIR: &str = "/var/lib/pvc/master";

pub struct Master {
    pub key: KeyPair,
    pub cluster: ClusterId,
    db: Database,
}

/// An admitted host as the registry lists it.
pub struct Entry {
    pub record: MembershipRecord,
    pub signed: SignedRecord,
    pub revoked: bool,
}

fn key_path(dir: &Path) -> PathBuf {
    dir.join("master.key")
}

impl Master {
    /// Creates the master key pair and an empty registry in `dir`.
    pub fn init(dir: &Path) -> anyhow::Result<Self> {
        if key_path(dir).exists() {
            bail!(
                "{} already holds a master key: a cluster is created once",
                dir.display()
            );
        }
        let key = KeyPair::create(&key_path(dir))?;
        let db =
            Database::create(dir.join("registry.redb")).context("cannot create the registry")?;
        let tx = db.begin_write()?;
        tx.open_table(RECORDS)?;
        tx.open_table(DOCS)?;
        tx.open_table(COUNTERS)?;
        tx.commit()?;
        Ok(Self {
            cluster: ClusterId::of(&key.public),
            key,
            db,
        })
    }

    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        if !key_path(dir).exists() {
            bail!(
                "no master key in {}: create the cluster with `pvc master init --dir {}`",
                dir.display(),
                dir.display()
            );
        }
        let key = KeyPair::load(&key_path(dir))?;
        let db = Database::create(dir.join("registry.redb")).context("cannot open the registry")?;
        Ok(Self {
            cluster: ClusterId::of(&key.public),
            key,
            db,
        })
    }

    pub fn entries(&self) -> anyhow::Result<Vec<Entry>> {
        let tx = self.db.begin_read()?;
        let revoked = self
            .revocations_in(&tx)?
            .map(|(r, _)| r.serials)
            .unwrap_or_default();
        let mut out = Vec::new();
        for row in tx.open_table(RECORDS)?.iter()? {
            let (_, v) = row?;
            let signed: SignedRecord =
                postcard::from_bytes(v.value()).context("corrupt registry")?;
            let record = signed
                .verify(&self.key.public)
                .map_err(|e| anyhow!("corrupt registry: {e}"))?;
            out.push(Entry {
                revoked: revoked.contains(&record.serial),
                record,
                signed,
            });
        }
        out.sort_by_key(|e| e.record.serial);
        Ok(out)
    }

    fn revocations_in(
        &self,
        tx: &redb::ReadTransaction,
    ) -> anyhow::Result<Option<(Revocations, SignedRevocations)>> {
        let docs = tx.open_table(DOCS)?;
        let Some(v) = docs.get("revocations")? else {
            return Ok(None);
        };
        let signed: SignedRevocations = postcard::from_bytes(v.value())?;
        Ok(Some((
            signed
                .verify(&self.key.public)
                .map_err(|e| anyhow!("corrupt registry: {e}"))?,
            signed,
        )))
    }

    fn policy(&self) -> anyhow::Result<Option<(GlobalPolicy, SignedPolicy)>> {
        let tx = self.db.begin_read()?;
        let docs = tx.open_table(DOCS)?;
        let Some(v) = docs.get("policy")? else {
            return Ok(None);
        };
        let signed: SignedPolicy = postcard::from_bytes(v.value())?;
        Ok(Some((
            signed
                .verify(&self.key.public)
                .map_err(|e| anyhow!("corrupt registry: {e}"))?,
            signed,
        )))
    }

    /// Signs a membership record and stores it. A name or virtual address
    /// held by a record that is not revoked cannot be given again.
    pub fn admit(
        &self,
        name: &str,
        virtual_ip: Ipv4Addr,
        host_key: PublicKey,
        groups: Vec<String>,
        valid_for: Duration,
    ) -> anyhow::Result<SignedRecord> {
        if !valid_name(name) {
            bail!("{name:?} is not a valid member name (a-z, 0-9, '-', at most 63 characters)");
        }
        if !valid_virtual_address(virtual_ip) {
            bail!(
                "{virtual_ip} is not an assignable virtual address (240.0.0.1 to 255.255.255.254)"
            );
        }
        if let Some(g) = groups.iter().find(|g| !valid_name(g)) {
            bail!("{g:?} is not a valid group name");
        }
        for e in self.entries()?.iter().filter(|e| !e.revoked) {
            if e.record.name == name {
                bail!(
                    "name {name} is taken by {} (serial {}); revoke it first",
                    e.record.virtual_ip,
                    e.record.serial
                );
            }
            if e.record.virtual_ip == virtual_ip {
                bail!(
                    "virtual address {virtual_ip} is taken by {} (serial {}); revoke it first",
                    e.record.name,
                    e.record.serial
                );
            }
            if e.record.host_key == host_key {
                bail!(
                    "this host key is already admitted as {} ({})",
                    e.record.name,
                    e.record.virtual_ip
                );
            }
        }
        let tx = self.db.begin_write()?;
        let signed = {
            let mut counters = tx.open_table(COUNTERS)?;
            let serial = counters.get("serial")?.map_or(0, |v| v.value()) + 1;
            counters.insert("serial", serial)?;
            let now = unix_now();
            let record = MembershipRecord {
                cluster: self.cluster,
                serial,
                name: name.to_string(),
                virtual_ip,
                host_key,
                groups,
                not_before: now.saturating_sub(300),
                not_after: now + valid_for.as_secs(),
            };
            let signed = SignedRecord::sign(&record, &self.key.pair);
            tx.open_table(RECORDS)?.insert(
                format!("{serial:020}").as_str(),
                postcard::to_stdvec(&signed)?.as_slice(),
            )?;
            signed
        };
        tx.commit()?;
        Ok(signed)
    }

    /// Adds a member's record to the signed revocation list (new version).
    pub fn revoke(&self, name: &str) -> anyhow::Result<(MembershipRecord, SignedRevocations)> {
        let entry = self
            .entries()?
            .into_iter()
            .find(|e| e.record.name == name && !e.revoked)
            .ok_or_else(|| anyhow!("no admitted member named {name}"))?;
        let tx = self.db.begin_write()?;
        let mut list = self
            .revocations_in(&self.db.begin_read()?)?
            .map(|(r, _)| r)
            .unwrap_or(Revocations {
                cluster: self.cluster,
                ..Default::default()
            });
        list.version += 1;
        list.issued_at = unix_now();
        list.serials.push(entry.record.serial);
        let signed = SignedRevocations::sign(&list, &self.key.pair);
        tx.open_table(DOCS)?
            .insert("revocations", postcard::to_stdvec(&signed)?.as_slice())?;
        tx.commit()?;
        Ok((entry.record, signed))
    }

    /// Signs a new version of the global policy.
    pub fn set_policy(&self, rules: Vec<PolicyRule>) -> anyhow::Result<SignedPolicy> {
        let version = self.policy()?.map_or(0, |(p, _)| p.version) + 1;
        let policy = GlobalPolicy {
            cluster: self.cluster,
            version,
            issued_at: unix_now(),
            rules,
        };
        let signed = SignedPolicy::sign(&policy, &self.key.pair);
        let tx = self.db.begin_write()?;
        tx.open_table(DOCS)?
            .insert("policy", postcard::to_stdvec(&signed)?.as_slice())?;
        tx.commit()?;
        Ok(signed)
    }

    /// Everything brokers should hold: records of members not revoked, the
    /// revocation list, the policy. Split so that each fits in a frame.
    pub fn publications(&self) -> anyhow::Result<Vec<Publication>> {
        let records: Vec<SignedRecord> = self
            .entries()?
            .into_iter()
            .filter(|e| !e.revoked)
            .map(|e| e.signed)
            .collect();
        let revocations = self.revocations_in(&self.db.begin_read()?)?.map(|(_, s)| s);
        let policy = self.policy()?.map(|(_, s)| s);
        let mut out = vec![Publication {
            master_key: self.key.public,
            records: Vec::new(),
            revocations,
            policy,
        }];
        for chunk in records.chunks(100) {
            out.push(Publication {
                master_key: self.key.public,
                records: chunk.to_vec(),
                revocations: None,
                policy: None,
            });
        }
        Ok(out)
    }
}

/// Sends everything to each broker; fails if one of them does not take it.
pub async fn publish(publications: &[Publication], brokers: &[String]) -> anyhow::Result<()> {
    for broker in brokers {
        let mut link = broker_client::connect(broker, None).await?;
        for p in publications {
            match broker_client::request(
                &mut link,
                AgentMessage::Publish(p.clone()),
                Duration::from_secs(10),
            )
            .await
            .with_context(|| format!("broker {broker}"))?
            {
                BrokerMessage::Published { .. } => {}
                other => bail!("broker {broker} did not confirm the publication: {other:?}"),
            }
        }
    }
    Ok(())
}

/// The global policy file: `[[rule]]` tables with `from`, `to`, `ports`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub rule: Vec<PolicyFileRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFileRule {
    pub from: Vec<String>,
    pub to: Vec<String>,
    pub ports: Vec<String>,
}

impl PolicyFile {
    pub fn rules(&self) -> anyhow::Result<Vec<PolicyRule>> {
        self.rule
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let sel = |v: &[String]| {
                    v.iter()
                        .map(|s| s.parse::<Selector>())
                        .collect::<Result<Vec<_>, _>>()
                };
                let ports = r
                    .ports
                    .iter()
                    .map(|p| p.parse::<PortRange>())
                    .collect::<Result<Vec<_>, _>>();
                Ok(PolicyRule {
                    from: sel(&r.from).map_err(|e| anyhow!("rule {i}: {e}"))?,
                    to: sel(&r.to).map_err(|e| anyhow!("rule {i}: {e}"))?,
                    ports: ports.map_err(|e| anyhow!("rule {i}: {e}"))?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pvc-master-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const YEAR: Duration = Duration::from_secs(365 * 86400);

    #[test]
    fn the_registry_keeps_names_addresses_and_serials_unique_across_restarts() {
        let d = dir("registry");
        let (ka, kb, kc) = (PublicKey([1; 32]), PublicKey([2; 32]), PublicKey([3; 32]));
        {
            let m = Master::init(&d).unwrap();
            assert!(Master::init(&d).is_err(), "a cluster is created once");
            let a = m
                .admit("a", Ipv4Addr::new(240, 0, 0, 1), ka, vec![], YEAR)
                .unwrap();
            assert_eq!(a.verify(&m.key.public).unwrap().serial, 1);
        }
        let m = Master::open(&d).unwrap();
        let e = m
            .admit("a", Ipv4Addr::new(240, 0, 0, 2), kb, vec![], YEAR)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("name a is taken"), "{e}");
        let e = m
            .admit("b", Ipv4Addr::new(240, 0, 0, 1), kb, vec![], YEAR)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("240.0.0.1 is taken"), "{e}");
        let e = m
            .admit("b", Ipv4Addr::new(240, 0, 0, 2), ka, vec![], YEAR)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("already admitted"), "{e}");
        let b = m
            .admit(
                "b",
                Ipv4Addr::new(240, 0, 0, 2),
                kb,
                vec!["gpu".into()],
                YEAR,
            )
            .unwrap();
        assert_eq!(b.verify(&m.key.public).unwrap().serial, 2);

        let (revoked, list) = m.revoke("a").unwrap();
        assert_eq!(revoked.serial, 1);
        let list = list.verify(&m.key.public).unwrap();
        assert_eq!((list.version, list.serials.clone()), (1, vec![1]));
        assert!(m.revoke("a").is_err(), "already revoked");
        // The name and address are free again; the serial is new.
        let a2 = m
            .admit("a", Ipv4Addr::new(240, 0, 0, 1), kc, vec![], YEAR)
            .unwrap();
        assert_eq!(a2.verify(&m.key.public).unwrap().serial, 3);
        drop(m);
        let m = Master::open(&d).unwrap();
        let names: Vec<(String, bool)> = m
            .entries()
            .unwrap()
            .into_iter()
            .map(|e| (e.record.name, e.revoked))
            .collect();
        assert_eq!(
            names,
            vec![("a".into(), true), ("b".into(), false), ("a".into(), false)]
        );
        let pubs = m.publications().unwrap();
        assert_eq!(
            pubs.iter().map(|p| p.records.len()).sum::<usize>(),
            2,
            "revoked records are not published"
        );
        assert!(pubs[0].revocations.is_some());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn policy_files_parse_and_are_versioned() {
        let d = dir("policy");
        let m = Master::init(&d).unwrap();
        let file: PolicyFile = toml::from_str(
            r#"
[[rule]]
from = ["*"]
to = ["group:web"]
ports = ["443", "8000-8100"]
"#,
        )
        .unwrap();
        let rules = file.rules().unwrap();
        assert_eq!(rules[0].ports.len(), 2);
        let p1 = m
            .set_policy(rules.clone())
            .unwrap()
            .verify(&m.key.public)
            .unwrap();
        let p2 = m.set_policy(rules).unwrap().verify(&m.key.public).unwrap();
        assert_eq!((p1.version, p2.version), (1, 2));
        let bad: PolicyFile =
            toml::from_str("[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"http\"]\n").unwrap();
        assert!(bad.rules().unwrap_err().to_string().contains("rule 0"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
