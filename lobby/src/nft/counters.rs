//! The packets of the table's named counters (the policies' refusals),
//! asked of the kernel over nfnetlink rather than through `nft`: nft 1.0.6
//! fetches every element of every set before it lists anything but chains
//! and set declarations, about a second of CPU per 100,000-prefix block
//! list (measured), and the counters are read for every `lobby stats` and
//! by the reset check every 2 s.
use std::collections::BTreeMap;

use crate::nfnetlink::{self, DumpError, Request, attribute, push_attribute};

// linux/netfilter/nfnetlink.h and nf_tables.h.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETOBJ: u16 = 19;
const NFPROTO_INET: u8 = 1;
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;

/// Packets by counter name of the named counters of `inet table`; none
/// when the table does not exist. Blocks: the caller runs it off the loop.
pub fn read(table: &str) -> Result<BTreeMap<String, u64>, DumpError> {
    // The kernel filters by table and type itself.
    let mut attributes = Vec::new();
    push_attribute(&mut attributes, NFTA_OBJ_TABLE, &zero_ended(table));
    push_attribute(
        &mut attributes,
        NFTA_OBJ_TYPE,
        &NFT_OBJECT_COUNTER.to_be_bytes(),
    );
    let request = Request {
        subsystem: NFNL_SUBSYS_NFTABLES,
        message: NFT_MSG_GETOBJ,
        family: NFPROTO_INET,
        attributes: &attributes,
    };
    let mut counters = BTreeMap::new();
    match nfnetlink::dump(&request, |attributes| {
        counters.extend(counter(attributes));
    }) {
        Ok(()) => Ok(counters),
        Err(DumpError::Refused(e)) if e.raw_os_error() == Some(libc::ENOENT) => Ok(BTreeMap::new()),
        Err(e) => Err(e),
    }
}

fn zero_ended(name: &str) -> Vec<u8> {
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// The name and packets of one object message's attributes.
fn counter(attributes: &[u8]) -> Option<(String, u64)> {
    let name = attribute(attributes, NFTA_OBJ_NAME)?;
    let name = String::from_utf8_lossy(name.strip_suffix(&[0]).unwrap_or(name)).into_owned();
    let data = attribute(attributes, NFTA_OBJ_DATA)?;
    let packets = attribute(data, NFTA_COUNTER_PACKETS)?;
    Some((name, u64::from_be_bytes(packets.try_into().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counter object's attributes as the kernel sends them, with the
    /// attributes the reader skips around the ones it reads.
    fn counter_attributes(name: &str, packets: u64) -> Vec<u8> {
        let mut data = Vec::new();
        push_attribute(&mut data, 1, &7u64.to_be_bytes()); // bytes
        push_attribute(&mut data, NFTA_COUNTER_PACKETS, &packets.to_be_bytes());
        let mut attributes = Vec::new();
        push_attribute(&mut attributes, NFTA_OBJ_TABLE, b"lobby\0");
        push_attribute(&mut attributes, NFTA_OBJ_NAME, &zero_ended(name));
        push_attribute(&mut attributes, NFTA_OBJ_TYPE, &1u32.to_be_bytes());
        // Nested: the kernel sets NLA_F_NESTED.
        push_attribute(&mut attributes, NFTA_OBJ_DATA | 0x8000, &data);
        attributes
    }

    #[test]
    fn a_counter_object_gives_its_name_and_packets() {
        assert_eq!(
            counter(&counter_attributes("target-web-blocked", 42)),
            Some(("target-web-blocked".to_owned(), 42))
        );
    }

    #[test]
    fn a_truncated_object_is_no_counter() {
        let attributes = counter_attributes("target-web-blocked", 42);
        assert_eq!(counter(&attributes[..attributes.len() - 3]), None);
    }
}
