//! Dumps over nfnetlink, netfilter's netlink protocol: one request, then
//! the kernel's messages until the dump's end. How the daemon reads what
//! conntrack holds and the table's named counters without running a tool.
use std::io;

pub const NLMSG_HEADER: usize = 16;
pub const NFGENMSG: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("{op} a netfilter netlink socket")]
    Socket {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused the netlink dump")]
    Refused(#[source] io::Error),
    #[error("a malformed netfilter netlink message")]
    Malformed,
}

/// What to dump: a subsystem's get message for one family (0: all), with
/// the attributes the kernel filters by.
pub struct Request<'a> {
    pub subsystem: u16,
    pub message: u16,
    pub family: u8,
    pub attributes: &'a [u8],
}

impl Request<'_> {
    fn encode(&self) -> Vec<u8> {
        let length = NLMSG_HEADER + NFGENMSG + self.attributes.len();
        let mut out = Vec::with_capacity(length);
        out.extend_from_slice(&(length as u32).to_ne_bytes());
        out.extend_from_slice(&(self.subsystem << 8 | self.message).to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        // nfgenmsg: the family, version 0, resource 0.
        out.extend_from_slice(&[self.family, 0, 0, 0]);
        out.extend_from_slice(self.attributes);
        out
    }
}

/// Sends `request` and hands the attributes of each message of the reply
/// to `each`, until the dump ends. Blocks: callers run it off the loop.
pub fn dump(request: &Request, mut each: impl FnMut(&[u8])) -> Result<(), DumpError> {
    let socket = Socket::open()?;
    socket.send(&request.encode())?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = socket.recv(&mut buf)?;
        if walk(&buf[..n], &mut each)? {
            return Ok(());
        }
    }
}

/// Hands the attributes of each netlink message in `buf` to `each`; `true`
/// at the end of the dump.
pub fn walk(mut buf: &[u8], each: &mut impl FnMut(&[u8])) -> Result<bool, DumpError> {
    while buf.len() >= NLMSG_HEADER {
        let length = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().expect("2 bytes"));
        if length < NLMSG_HEADER || length > buf.len() {
            return Err(DumpError::Malformed);
        }
        match i32::from(kind) {
            libc::NLMSG_DONE => return Ok(true),
            libc::NLMSG_ERROR => {
                let code = buf
                    .get(NLMSG_HEADER..NLMSG_HEADER + 4)
                    .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                    .ok_or(DumpError::Malformed)?;
                if code != 0 {
                    return Err(DumpError::Refused(io::Error::from_raw_os_error(-code)));
                }
            }
            _ => each(
                buf.get(NLMSG_HEADER + NFGENMSG..length)
                    .ok_or(DumpError::Malformed)?,
            ),
        }
        buf = &buf[align(length).min(buf.len())..];
    }
    Ok(false)
}

/// The payload of the first attribute of `kind` among `attributes`.
pub fn attribute(mut attributes: &[u8], kind: u16) -> Option<&[u8]> {
    while attributes.len() >= 4 {
        let length = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
        // Without the nested and byte-order flags.
        let found = u16::from_ne_bytes([attributes[2], attributes[3]]) & 0x3fff;
        if length < 4 || length > attributes.len() {
            return None;
        }
        if found == kind {
            return Some(&attributes[4..length]);
        }
        attributes = &attributes[align(length).min(attributes.len())..];
    }
    None
}

/// Appends an attribute of `kind` around `payload`, padded.
pub fn push_attribute(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(align(out.len()), 0);
}

/// Netlink aligns messages and attributes to 4 bytes.
fn align(length: usize) -> usize {
    (length + 3) & !3
}

/// A raw NETLINK_NETFILTER socket, closed on drop.
struct Socket(libc::c_int);

impl Socket {
    fn open() -> Result<Self, DumpError> {
        // SAFETY: plain socket(2); the descriptor is owned by the result.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(DumpError::Socket {
                op: "opening",
                source: io::Error::last_os_error(),
            });
        }
        let socket = Self(fd);
        // A dump that never ends must not hold a blocking thread forever.
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: the option value is a timeval we own, with its size.
        let set = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(DumpError::Socket {
                op: "configuring",
                source: io::Error::last_os_error(),
            });
        }
        Ok(socket)
    }

    fn send(&self, request: &[u8]) -> Result<(), DumpError> {
        // SAFETY: a zeroed sockaddr_nl with its family is the kernel's address.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: the buffer and the address live across the call.
        let sent = unsafe {
            libc::sendto(
                self.0,
                request.as_ptr().cast(),
                request.len(),
                0,
                (&raw const kernel).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(DumpError::Socket {
                op: "writing to",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> Result<usize, DumpError> {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(n).map_err(|_| DumpError::Socket {
            op: "reading from",
            source: io::Error::last_os_error(),
        })
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.0) };
    }
}

/// A netlink message of `kind` around `payload` (nfgenmsg included), as
/// the kernel sends it: for the tests of what reads dumps.
#[cfg(test)]
pub fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&((NLMSG_HEADER + payload.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&[0; 10]);
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_walked_to_the_end_or_the_refusal() {
        let mut attributes = Vec::new();
        push_attribute(&mut attributes, 2, b"abc\0");
        let body = [vec![1, 0, 0, 0], attributes].concat();
        let dump = [message(10 << 8 | 18, &body), message(10 << 8 | 18, &body)].concat();
        let mut seen = Vec::new();
        assert!(
            !walk(&dump, &mut |a: &[u8]| seen
                .push(attribute(a, 2).map(<[u8]>::to_vec)))
            .unwrap()
        );
        assert_eq!(seen, vec![Some(b"abc\0".to_vec()); 2]);
        let done = message(libc::NLMSG_DONE as u16, &[0; 4]);
        assert!(walk(&done, &mut |_: &[u8]| {}).unwrap());
        let refused = message(libc::NLMSG_ERROR as u16, &(-libc::EPERM).to_ne_bytes());
        let error = walk(&refused, &mut |_: &[u8]| {}).unwrap_err();
        assert!(matches!(&error, DumpError::Refused(e) if e.raw_os_error() == Some(libc::EPERM)));
        assert!(matches!(
            walk(&dump[..20], &mut |_: &[u8]| {}),
            Err(DumpError::Malformed)
        ));
    }

    #[test]
    fn a_request_carries_its_family_and_attributes() {
        let request = Request {
            subsystem: 10,
            message: 19,
            family: 1,
            attributes: &[8, 0, 1, 0, b'l', b'b', 0, 0],
        };
        let bytes = request.encode();
        assert_eq!(bytes.len(), NLMSG_HEADER + NFGENMSG + 8);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 28);
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 10 << 8 | 19);
        assert_eq!(bytes[NLMSG_HEADER], 1);
        assert_eq!(
            attribute(&bytes[NLMSG_HEADER + NFGENMSG..], 1),
            Some(&b"lb\0\0"[..])
        );
    }
}
