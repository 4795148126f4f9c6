//! Domain virtualization (paper §4.2): the host gets its virtual address and
//! routes for the virtual network, configured over rtnetlink.
//!
//! - Each member with a path gets a /32 route via the next hop of its *real*
//!   address: the kernel resolves that neighbour and builds the right frame,
//!   and tc egress only rewrites the IP header. No FIB lookup per packet, and
//!   the host need not forward.
//! - The rest of 240.0.0.0/4 goes to a placeholder next hop (240.0.0.0) with a
//!   permanent neighbour entry, so the kernel never sends an ARP request for a
//!   virtual address (which would hold packets until it failed); tc egress
//!   drops those packets with a reason.
//! - All these routes use the uplink, so strict reverse-path filtering
//!   accepts the masqueraded packets that come back.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context as _, anyhow, bail};
use futures::TryStreamExt as _;
use netlink_packet_route::{
    address::AddressAttribute,
    link::LinkAttribute,
    neighbour::NeighbourState,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
};
use rtnetlink::{Handle, RouteMessageBuilder};
use tracing::info;

pub mod dns;

/// The prefix of the virtual network.
pub const VIRTUAL_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(240, 0, 0, 0), 4);
/// Placeholder next hop of the 240.0.0.0/4 route (never a member's address).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(240, 0, 0, 0);

/// An IPv4 network of the uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalNet {
    pub address: Ipv4Addr,
    pub prefix: u8,
}

impl LocalNet {
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        };
        u32::from(self.address) & mask == u32::from(a) & mask
    }
}

#[derive(Debug, Clone)]
pub struct Uplink {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub networks: Vec<LocalNet>,
}

pub fn connect() -> anyhow::Result<Handle> {
    let (connection, handle, _) =
        rtnetlink::new_connection().context("cannot open a netlink socket")?;
    tokio::spawn(connection);
    Ok(handle)
}

async fn link_index(handle: &Handle, name: &str) -> anyhow::Result<(u32, Vec<LinkAttribute>)> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .ok()
        .flatten()
        .ok_or_else(|| anyhow!("interface {name} does not exist in this network namespace"))?;
    Ok((link.header.index, link.attributes))
}

/// `interposition.uplink` that follows the host's default route.
pub const AUTO_UPLINK: &str = "auto";

/// The uplink the configuration names, or (`auto`) the interface of the
/// IPv4 default route.
pub async fn resolve_uplink(handle: &Handle, configured: &str) -> anyhow::Result<Uplink> {
    if configured != AUTO_UPLINK {
        return uplink(handle, configured).await;
    }
    let name = default_route_interface(handle).await?.ok_or_else(|| {
        anyhow!(
            "interposition.uplink = \"auto\" follows the IPv4 default route, and this host has \
             none: connect it, or name the uplink (interposition.uplink = \"eth0\")"
        )
    })?;
    uplink(handle, &name).await
}

/// The interface of the IPv4 default route (the lowest metric), if any.
async fn default_route_interface(handle: &Handle) -> anyhow::Result<Option<String>> {
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut best: Option<(u32, u32)> = None;
    while let Some(r) = routes.try_next().await.context("cannot list routes")? {
        if r.header.destination_prefix_length != 0
            || r.header.table != netlink_packet_route::route::RouteHeader::RT_TABLE_MAIN
        {
            continue;
        }
        let oif = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        let metric = r
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Priority(p) => Some(*p),
                _ => None,
            })
            .unwrap_or(0);
        if let Some(oif) = oif
            && best.is_none_or(|(m, _)| metric < m)
        {
            best = Some((metric, oif));
        }
    }
    let Some((_, index)) = best else {
        return Ok(None);
    };
    let mut links = handle.link().get().match_index(index).execute();
    let link = links.try_next().await.context("cannot read the link")?;
    Ok(link.and_then(|l| {
        l.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n),
            _ => None,
        })
    }))
}

pub async fn uplink(handle: &Handle, name: &str) -> anyhow::Result<Uplink> {
    let (index, attributes) = link_index(handle, name).await?;
    let mac = attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(m) if m.len() == 6 => Some([m[0], m[1], m[2], m[3], m[4], m[5]]),
            _ => None,
        })
        .ok_or_else(|| {
            anyhow!("interface {name} has no Ethernet address; PVC needs an Ethernet uplink")
        })?;
    let mut networks = Vec::new();
    let mut addresses = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(msg) = addresses
        .try_next()
        .await
        .context("cannot list addresses")?
    {
        for attr in &msg.attributes {
            if let AddressAttribute::Local(IpAddr::V4(a)) = attr {
                networks.push(LocalNet {
                    address: *a,
                    prefix: msg.header.prefix_len,
                });
            }
        }
    }
    Ok(Uplink {
        name: name.to_string(),
        index,
        mac,
        networks,
    })
}

/// Routes the agent owns carry this protocol number (`ip route` shows
/// "proto 80"), so that they are told apart from the administrator's.
pub const ROUTE_PROTOCOL: RouteProtocol = RouteProtocol::Other(80);

fn route(dest: (Ipv4Addr, u8), via: Ipv4Addr, uplink: u32, virtual_ip: Ipv4Addr) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dest.0, dest.1)
        .gateway(via)
        .output_interface(uplink)
        .onlink()
        .pref_source(virtual_ip)
        .protocol(ROUTE_PROTOCOL)
        .build()
}

fn is_gone(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m)
        if m.code.is_some_and(|c| matches!(-c.get(), libc::ESRCH | libc::ENOENT | libc::EADDRNOTAVAIL | libc::ENODEV)))
}

/// The next hop the kernel uses for a real address, and its interface.
pub async fn next_hop(handle: &Handle, real: Ipv4Addr) -> anyhow::Result<(Ipv4Addr, u32)> {
    let query = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(real, 32)
        .build();
    let answer = handle
        .route()
        .get(query)
        .execute()
        .try_next()
        .await
        .with_context(|| format!("no route to {real}"))?
        .ok_or_else(|| anyhow!("no route to {real}"))?;
    let mut via = real;
    let mut oif = None;
    for attr in &answer.attributes {
        match attr {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = *g,
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    Ok((
        via,
        oif.ok_or_else(|| anyhow!("the route to {real} has no interface"))?,
    ))
}

/// Routes a member's virtual address via `via` (the next hop of its real
/// address) on the uplink.
pub async fn set_peer_route(
    handle: &Handle,
    peer: Ipv4Addr,
    via: Ipv4Addr,
    uplink: u32,
    virtual_ip: Ipv4Addr,
) -> anyhow::Result<()> {
    // A local route (the relay) would take precedence.
    remove_route_in(handle, peer, Some(LOCAL_TABLE)).await?;
    handle
        .route()
        .add(route((peer, 32), via, uplink, virtual_ip))
        .replace()
        .execute()
        .await
        .with_context(|| format!("cannot route {peer} via {via}"))
}

/// The kernel's table of local routes.
const LOCAL_TABLE: u32 = 255;

/// Makes a member reached through the relay local: the application's
/// connection arrives on `lo` (where the relay's sk_lookup program hands
/// it to the agent), from our virtual address. Replaces a route via the
/// uplink, so that no packet of a new flow to the member leaves on the wire.
pub async fn set_relay_route(
    handle: &Handle,
    peer: Ipv4Addr,
    virtual_ip: Ipv4Addr,
) -> anyhow::Result<()> {
    remove_route_in(handle, peer, None).await?;
    let (lo, _) = link_index(handle, "lo").await?;
    let msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(peer, 32)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .table_id(LOCAL_TABLE)
        .output_interface(lo)
        .pref_source(virtual_ip)
        .protocol(ROUTE_PROTOCOL)
        .build();
    handle
        .route()
        .add(msg)
        .replace()
        .execute()
        .await
        .with_context(|| format!("cannot make {peer} local for the relay"))
}

/// Removes a member's route, via the uplink or local (relay).
pub async fn remove_peer_route(handle: &Handle, peer: Ipv4Addr) -> anyhow::Result<()> {
    remove_route_in(handle, peer, None).await?;
    remove_route_in(handle, peer, Some(LOCAL_TABLE)).await
}

async fn remove_route_in(
    handle: &Handle,
    peer: Ipv4Addr,
    table: Option<u32>,
) -> anyhow::Result<()> {
    let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(peer, 32)
        .protocol(ROUTE_PROTOCOL);
    if let Some(t) = table {
        // The kernel matches the scope of a deleted route unless it is
        // "nowhere": a local route's (host) never matches the default.
        msg = msg
            .table_id(t)
            .kind(RouteType::Local)
            .scope(RouteScope::NoWhere);
    }
    match handle.route().del(msg.build()).execute().await {
        Err(e) if !is_gone(&e) => {
            Err(e).with_context(|| format!("cannot remove the route to {peer}"))
        }
        _ => Ok(()),
    }
}

/// Members' virtual addresses that have a route of ours (left by this agent
/// or a previous one).
pub async fn peer_routes(handle: &Handle) -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut peers = Vec::new();
    while let Some(r) = routes.try_next().await.context("cannot list routes")? {
        if r.header.protocol != ROUTE_PROTOCOL || r.header.destination_prefix_length != 32 {
            continue;
        }
        for attr in &r.attributes {
            if let RouteAttribute::Destination(RouteAddress::Inet(d)) = attr
                && pvc_common::is_virtual(d.octets())
            {
                peers.push(*d);
            }
        }
    }
    Ok(peers)
}

/// Puts the virtual address on `lo`, the placeholder neighbour on the uplink
/// and the 240.0.0.0/4 route. Idempotent (replaces what is there).
pub async fn configure(
    handle: &Handle,
    uplink: &Uplink,
    virtual_ip: Ipv4Addr,
) -> anyhow::Result<()> {
    let (lo, _) = link_index(handle, "lo").await?;
    handle
        .address()
        .add(lo, IpAddr::V4(virtual_ip), 32)
        .replace()
        .execute()
        .await
        .with_context(|| format!("cannot add {virtual_ip}/32 to lo"))?;
    handle
        .neighbours()
        .add(uplink.index, IpAddr::V4(GATEWAY))
        .link_layer_address(&uplink.mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .with_context(|| {
            format!(
                "cannot add the neighbour entry {GATEWAY} on {}",
                uplink.name
            )
        })?;
    handle
        .route()
        .add(route(VIRTUAL_NET, GATEWAY, uplink.index, virtual_ip))
        .replace()
        .execute()
        .await
        .with_context(|| format!("cannot add the route 240.0.0.0/4 via {}", uplink.name))?;
    info!(%virtual_ip, uplink = uplink.name, "virtual address and route 240.0.0.0/4 configured");
    Ok(())
}

/// Removes what `configure` and `set_peer_route` added; what is already gone
/// is not an error.
pub async fn deconfigure(
    handle: &Handle,
    uplink: Option<u32>,
    virtual_ip: Ipv4Addr,
) -> anyhow::Result<()> {
    let gone = is_gone;
    let mut failures = Vec::new();
    for peer in peer_routes(handle).await? {
        if let Err(e) = remove_peer_route(handle, peer).await {
            failures.push(format!("{e:#}"));
        }
    }
    if let Some(index) = uplink {
        if let Err(e) = handle
            .route()
            .del(route(VIRTUAL_NET, GATEWAY, index, virtual_ip))
            .execute()
            .await
            && !gone(&e)
        {
            failures.push(format!("route 240.0.0.0/4: {e}"));
        }
        let mut neigh = handle.neighbours().add(index, IpAddr::V4(GATEWAY));
        let msg = neigh.message_mut().clone();
        if let Err(e) = handle.neighbours().del(msg).execute().await
            && !gone(&e)
        {
            failures.push(format!("neighbour {GATEWAY}: {e}"));
        }
    }
    let (lo, _) = link_index(handle, "lo").await?;
    let mut addr = handle.address().add(lo, IpAddr::V4(virtual_ip), 32);
    let msg = addr.message_mut().clone();
    if let Err(e) = handle.address().del(msg).execute().await
        && !gone(&e)
    {
        failures.push(format!("address {virtual_ip}/32 on lo: {e}"));
    }
    if !failures.is_empty() {
        bail!("could not remove: {}", failures.join("; "));
    }
    Ok(())
}

/// Removes a link by name (gone already is fine).
pub async fn remove_link(handle: &Handle, name: &str) -> anyhow::Result<()> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => handle
            .link()
            .del(link.header.index)
            .execute()
            .await
            .with_context(|| format!("cannot remove the link {name}")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_contain_their_addresses() {
        let n = LocalNet {
            address: Ipv4Addr::new(198, 18, 0, 1),
            prefix: 24,
        };
        assert!(n.contains(Ipv4Addr::new(198, 18, 0, 200)));
        assert!(!n.contains(Ipv4Addr::new(198, 18, 1, 1)));
        let all = LocalNet {
            address: Ipv4Addr::new(198, 18, 0, 1),
            prefix: 0,
        };
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
        let host = LocalNet {
            address: Ipv4Addr::new(198, 18, 0, 1),
            prefix: 32,
        };
        assert!(!host.contains(Ipv4Addr::new(198, 18, 0, 2)));
    }
}
