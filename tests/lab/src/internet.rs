//! A simulated Internet in network namespaces: a core router that counts
//! every packet leaking a private or virtual address, brokers on public
//! addresses, and sites of the kinds members really sit in.
//!
//! ```text
//!            broker0 198.19.1.2     broker1 198.19.2.2
//!                      \                 /
//!                       +----- inet -----+        core router, no route to
//!                      /    |         |   \       198.18.0.0/16: leaks counted
//!   pub host 198.19.20.2    |         |    site j router, wan 198.19.(20+j).2
//!                           ...       LAN 198.19.(100+j).0/24 (fwl, fws: public)
//!                                     LAN 198.18.(10+j).0/24  (cone, upnp, sym: NAT)
//! ```
//!
//! Only 198.18.0.0/15 is used: 198.19/16 plays the public Internet,
//! 198.18/16 the private LANs behind NATs.

use std::{fs, net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, bail, ensure};

use super::{BrokerNode, Lab, bin, require_tools, sh, wait_until};

/// The kinds of site a member can sit in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// A public address, nothing in front of it.
    Pub,
    /// A public address behind a stateless firewall that drops inbound
    /// pure SYNs.
    Fwl,
    /// A public address behind a stateful firewall (inbound: only
    /// ESTABLISHED, RELATED).
    Fws,
    /// A port-preserving NAT (Linux MASQUERADE) with a stateful firewall.
    Cone,
    /// The same, with a real miniupnpd on the NAT box.
    Upnp,
    /// A symmetric NAT (MASQUERADE --random-fully) with a stateful firewall.
    Sym,
}

impl Site {
    pub const ALL: [Site; 6] = [
        Site::Pub,
        Site::Fwl,
        Site::Fws,
        Site::Cone,
        Site::Upnp,
        Site::Sym,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Site::Pub => "pub",
            Site::Fwl => "fwl",
            Site::Fws => "fws",
            Site::Cone => "cone",
            Site::Upnp => "upnp",
            Site::Sym => "sym",
        }
    }

    fn nat(self) -> bool {
        matches!(self, Site::Cone | Site::Upnp | Site::Sym)
    }
}

/// A site of the simulated Internet.
pub(crate) struct SiteNode {
    pub kind: Site,
    /// The NAT or firewall box (none for a public host).
    pub router: Option<String>,
    /// The site's public address (the router's, or the public host's).
    pub wan: Ipv4Addr,
}

pub(crate) struct Internet {
    /// The core router's namespace.
    pub inet: String,
    pub sites: Vec<SiteNode>,
}

/// The core router's chain that drops and counts leaks.
const LEAK_CHAIN: &str = "PVCLEAK";
/// The public address of a broker, and of a site's uplink.
fn broker_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 1 + i as u8, 2)
}
fn wan_net(j: usize) -> u8 {
    20 + j as u8
}
/// STUN (for miniupnpd) answers on broker 0.
pub const STUN_PORT: u16 = 3478;

impl Lab {
    /// A simulated Internet with two brokers and the given sites: each
    /// entry is a site kind and its number of members (a public site has
    /// exactly one). Members are named a, b, c, ... in order. Nothing runs
    /// yet but the sites' NAT and firewall rules (and miniupnpd, with the
    /// STUN server it needs).
    pub fn internet(sites: &[(Site, usize)]) -> anyhow::Result<Lab> {
        require_tools(&["ip", "nsenter", "iptables"]);
        if sites.iter().any(|(k, _)| *k == Site::Upnp) {
            require_tools(&["miniupnpd", "nft"]);
        }
        let mut lab = Lab::empty()?;
        // From here on, Drop cleans up whatever was made.
        lab.build_internet(sites)?;
        Ok(lab)
    }

    fn build_internet(&mut self, sites: &[(Site, usize)]) -> anyhow::Result<()> {
        let inet = format!("{}-inet", self.prefix);
        self.add_ns(&inet)?;
        sysctl(&inet, "net.ipv4.ip_forward=1")?;
        // Leaks: a private source or destination, or a virtual address,
        // reaching the core. The core has no route to the private space, so
        // such packets cannot go anywhere anyway: count them, before routing
        // drops those it has no route for.
        ipt(&inet, &["-t", "raw", "-N", LEAK_CHAIN])?;
        ipt(&inet, &["-t", "raw", "-A", "PREROUTING", "-j", LEAK_CHAIN])?;
        for dir in ["-s", "-d"] {
            for net in ["198.18.0.0/16", "240.0.0.0/4"] {
                ipt(
                    &inet,
                    &["-t", "raw", "-A", LEAK_CHAIN, dir, net, "-j", "DROP"],
                )?;
            }
        }
        self.internet = Some(Internet {
            inet: inet.clone(),
            sites: Vec::new(),
        });
        for i in 0..2 {
            let ns = format!("{}-broker{i}", self.prefix);
            self.add_ns(&ns)?;
            self.link_to_core(&ns, "eth0", &format!("b{i}"), 1 + i as u8)?;
            self.brokers.push(BrokerNode {
                netns: ns,
                addr: broker_ip(i),
                child: None,
            });
        }
        for (j, (kind, members)) in sites.iter().enumerate() {
            self.add_site(j, *kind, *members)?;
        }
        if sites.iter().any(|(k, _)| *k == Site::Upnp) {
            self.start_stun()?;
            for (j, (kind, _)) in sites.iter().enumerate() {
                if *kind == Site::Upnp {
                    self.start_miniupnpd(j)?;
                }
            }
        }
        Ok(())
    }

    /// A veth from the core to `ns` (as `wan` there, `eth0` for a host):
    /// 198.19.`net`.1 on the core, .2 in `ns`, default route via the core.
    fn link_to_core(&mut self, ns: &str, dev: &str, core_if: &str, net: u8) -> anyhow::Result<()> {
        let inet = self.inet_ns().to_string();
        sh(&[
            "ip", "link", "add", core_if, "netns", &inet, "type", "veth", "peer", "name", dev,
            "netns", ns,
        ])?;
        sh(&[
            "ip",
            "-n",
            &inet,
            "addr",
            "add",
            &format!("198.19.{net}.1/24"),
            "dev",
            core_if,
        ])?;
        sh(&["ip", "-n", &inet, "link", "set", core_if, "up"])?;
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("198.19.{net}.2/24"),
            "dev",
            dev,
        ])?;
        sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        sh(&[
            "ip",
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &format!("198.19.{net}.1"),
        ])?;
        Ok(())
    }

    fn inet_ns(&self) -> &str {
        &self.internet.as_ref().expect("an Internet lab").inet
    }

    fn add_site(&mut self, j: usize, kind: Site, members: usize) -> anyhow::Result<()> {
        let net = wan_net(j);
        let wan = Ipv4Addr::new(198, 19, net, 2);
        if kind == Site::Pub {
            ensure!(members == 1, "a public site has exactly one member");
            let name = Self::host_name(self.hosts.len());
            let netns = format!("{}-{name}", self.prefix);
            self.add_ns(&netns)?;
            self.link_to_core(&netns, "eth0", &format!("s{j}"), net)?;
            self.internet_mut().sites.push(SiteNode {
                kind,
                router: None,
                wan,
            });
            self.register_host(name, netns, wan, Some(j))?;
            return Ok(());
        }
        let router = format!("{}-r{j}", self.prefix);
        self.add_ns(&router)?;
        self.link_to_core(&router, "wan", &format!("s{j}"), net)?;
        sysctl(&router, "net.ipv4.ip_forward=1")?;
        sh(&["ip", "-n", &router, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &router, "link", "set", "br0", "up"])?;
        let lan: [u8; 3] = if kind.nat() {
            [198, 18, 10 + j as u8]
        } else {
            [198, 19, 100 + j as u8]
        };
        let lan_gw = Ipv4Addr::new(lan[0], lan[1], lan[2], 1);
        sh(&[
            "ip",
            "-n",
            &router,
            "addr",
            "add",
            &format!("{lan_gw}/24"),
            "dev",
            "br0",
        ])?;
        if !kind.nat() {
            // A public LAN: the core routes it to the site's firewall.
            let inet = self.inet_ns().to_string();
            let lan_net = format!("{}.{}.{}.0/24", lan[0], lan[1], lan[2]);
            sh(&[
                "ip",
                "-n",
                &inet,
                "route",
                "add",
                &lan_net,
                "via",
                &wan.to_string(),
            ])?;
        }
        self.firewall(&router, kind)?;
        self.internet_mut().sites.push(SiteNode {
            kind,
            router: Some(router.clone()),
            wan,
        });
        for k in 0..members {
            let name = Self::host_name(self.hosts.len());
            let netns = format!("{}-{name}", self.prefix);
            self.add_ns(&netns)?;
            let real = Ipv4Addr::new(lan[0], lan[1], lan[2], 2 + k as u8);
            let port = format!("h-{name}");
            sh(&[
                "ip", "link", "add", &port, "netns", &router, "type", "veth", "peer", "name",
                "eth0", "netns", &netns,
            ])?;
            sh(&[
                "ip", "-n", &router, "link", "set", &port, "master", "br0", "up",
            ])?;
            sh(&[
                "ip",
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{real}/24"),
                "dev",
                "eth0",
            ])?;
            sh(&["ip", "-n", &netns, "link", "set", "eth0", "up"])?;
            sh(&[
                "ip",
                "-n",
                &netns,
                "route",
                "add",
                "default",
                "via",
                &lan_gw.to_string(),
            ])?;
            self.register_host(name, netns, real, Some(j))?;
        }
        Ok(())
    }

    fn internet_mut(&mut self) -> &mut Internet {
        self.internet.as_mut().expect("an Internet lab")
    }

    /// The NAT and firewall rules of a site's box (like netlab's nat.sh).
    fn firewall(&self, router: &str, kind: Site) -> anyhow::Result<()> {
        if kind.nat() {
            let mut masquerade = vec![
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "wan",
                "-j",
                "MASQUERADE",
            ];
            if kind == Site::Sym {
                // A new port for every destination: a symmetric NAT.
                masquerade.push("--random-fully");
            }
            ipt(router, &masquerade)?;
        }
        for chain in ["INPUT", "FORWARD"] {
            match kind {
                Site::Pub => {}
                Site::Fwl => ipt(
                    router,
                    &["-A", chain, "-i", "wan", "-p", "tcp", "--syn", "-j", "DROP"],
                )?,
                Site::Fws | Site::Cone | Site::Upnp | Site::Sym => {
                    // Answers, and port forwards (UPnP mappings).
                    for state in ["ESTABLISHED,RELATED", "DNAT"] {
                        ipt(
                            router,
                            &[
                                "-A",
                                chain,
                                "-i",
                                "wan",
                                "-m",
                                "conntrack",
                                "--ctstate",
                                state,
                                "-j",
                                "ACCEPT",
                            ],
                        )?;
                    }
                    if kind == Site::Upnp && chain == "INPUT" {
                        // miniupnpd learns its external address by STUN.
                        ipt(
                            router,
                            &[
                                "-A",
                                chain,
                                "-i",
                                "wan",
                                "-p",
                                "udp",
                                "--sport",
                                &STUN_PORT.to_string(),
                                "-j",
                                "ACCEPT",
                            ],
                        )?;
                    }
                    ipt(router, &["-A", chain, "-i", "wan", "-j", "DROP"])?;
                }
            }
        }
        Ok(())
    }

    /// A STUN server (binding requests over UDP) on broker 0, for miniupnpd.
    fn start_stun(&mut self) -> anyhow::Result<()> {
        let ns = self.brokers[0].netns.clone();
        let addr = format!("{}:{STUN_PORT}", self.brokers[0].addr);
        let mut p = Self::command_in(&ns, None, bin("lab-stun"))?;
        p.cmd.args(["--listen", &addr]);
        let child = p.spawn_logged(&self.dir.join("stun.log"))?;
        self.children.push(child);
        Ok(())
    }

    /// miniupnpd (Debian's, nftables backend) on site `j`'s NAT box. It
    /// refuses to forward while its WAN address looks reserved (198.19/16
    /// is), unless it learns the external address by STUN.
    fn start_miniupnpd(&mut self, j: usize) -> anyhow::Result<()> {
        let router = self.net().sites[j].router.clone().expect("a NAT box");
        let lan = format!("198.18.{}.0/24", 10 + j);
        nft(
            &router,
            "table inet miniupnpd {\n\
             chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }\n\
             chain miniupnpd { }\n\
             chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }\n\
             chain postrouting { type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }\n\
             chain prerouting_miniupnpd { }\n\
             chain postrouting_miniupnpd { }\n\
             }\n",
        )?;
        let conf = self.dir.join(format!("miniupnpd-{j}.conf"));
        let leases = self.dir.join(format!("miniupnpd-{j}.leases"));
        fs::write(
            &conf,
            format!(
                "ext_ifname=wan\n\
                 listening_ip=br0\n\
                 http_port=5555\n\
                 enable_natpmp=yes\n\
                 enable_upnp=yes\n\
                 secure_mode=yes\n\
                 system_uptime=yes\n\
                 uuid=3a6c0b4e-8a4b-4f7e-9c1a-00000000000{j}\n\
                 upnp_table_name=miniupnpd\n\
                 upnp_nat_table_name=miniupnpd\n\
                 lease_file={leases}\n\
                 ext_perform_stun=yes\n\
                 ext_stun_host={stun}\n\
                 ext_stun_port={STUN_PORT}\n\
                 allow 1024-65535 {lan} 1024-65535\n\
                 deny 0-65535 0.0.0.0/0 0-65535\n",
                leases = leases.display(),
                stun = self.brokers[0].addr,
            ),
        )?;
        let log = self.dir.join(format!("miniupnpd-{j}.log"));
        let mut p = Self::command_in(&router, None, "miniupnpd")?;
        p.cmd
            .args(["-f"])
            .arg(&conf)
            .args(["-P"])
            .arg(self.dir.join(format!("miniupnpd-{j}.pid")))
            .arg("-d");
        let child = p.spawn_logged(&log)?;
        self.children.push(child);
        wait_until(Duration::from_secs(10), "miniupnpd to listen", || {
            fs::read_to_string(&log)
                .ok()?
                .contains("HTTP listening on port")
                .then_some(())
        })?;
        Ok(())
    }

    fn net(&self) -> &Internet {
        self.internet.as_ref().expect("an Internet lab")
    }

    /// Packets the core router dropped because they carried a private or a
    /// virtual address: leaks. Must stay 0.
    pub fn leaks(&self) -> anyhow::Result<u64> {
        let out = Self::command_in(self.inet_ns(), None, "iptables")?
            .args(["-t", "raw", "-L", LEAK_CHAIN, "-v", "-n", "-x"])
            .ok()?;
        Ok(out
            .lines()
            .filter(|l| l.contains("DROP"))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum())
    }

    /// The kind of site member `name` sits in.
    pub fn site_of(&self, name: &str) -> Site {
        let j = self
            .host(name)
            .site
            .expect("a member of the simulated Internet");
        self.net().sites[j].kind
    }

    /// Site `j`'s public address.
    pub fn site_wan(&self, j: usize) -> Ipv4Addr {
        self.net().sites[j].wan
    }

    /// Site `j`'s NAT or firewall box, to run commands in (conntrack, nft).
    pub fn router_netns(&self, j: usize) -> Option<String> {
        self.net().sites[j].router.clone()
    }

    /// Site `from`'s router lets no TCP connection request out to site
    /// `to`'s public address (everything else still passes).
    pub fn drop_syns_between_sites(&self, from: usize, to: usize) -> anyhow::Result<()> {
        let router = self
            .router_netns(from)
            .ok_or_else(|| anyhow::anyhow!("site {from} has no router"))?;
        let to = self.site_wan(to).to_string();
        Lab::command_in(&router, None, "iptables")?
            .args([
                "-I", "FORWARD", "-o", "wan", "-d", &to, "-p", "tcp", "--syn", "-j", "DROP",
            ])
            .ok()?;
        Ok(())
    }

    /// Cuts broker `i` off the Internet without closing anything: its
    /// sessions' sockets stay open, packets simply stop (a host gone, a
    /// cable pulled).
    pub fn cut_broker_link(&self, i: usize) -> anyhow::Result<()> {
        let dev = format!("b{i}");
        sh(&["ip", "-n", self.inet_ns(), "link", "set", &dev, "down"]).map(drop)
    }

    /// UPnP port mappings on site `j`'s box now (miniupnpd's nft table).
    pub fn upnp_mappings(&self, j: usize) -> anyhow::Result<Vec<String>> {
        let Some(router) = self.router_netns(j) else {
            bail!("site {j} has no NAT box");
        };
        let out = Self::command_in(&router, None, "nft")?
            .args(["list", "chain", "inet", "miniupnpd", "prerouting_miniupnpd"])
            .ok()
            .context("listing miniupnpd's forwards")?;
        Ok(out
            .lines()
            .filter(|l| l.contains("dnat"))
            .map(|l| l.trim().to_string())
            .collect())
    }
}

fn ipt(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = vec!["ip", "netns", "exec", ns, "iptables", "-w"];
    cmd.extend_from_slice(args);
    sh(&cmd).map(drop)
}

fn sysctl(ns: &str, setting: &str) -> anyhow::Result<()> {
    sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", setting]).map(drop)
}

fn nft(ns: &str, script: &str) -> anyhow::Result<()> {
    let file = std::env::temp_dir().join(format!("{ns}.nft"));
    fs::write(&file, script)?;
    let r = sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "nft",
        "-f",
        &file.to_string_lossy(),
    ]);
    let _ = fs::remove_file(&file);
    r.map(drop)
}
