//! A minimal ustar (POSIX.1-1988) writer for `ven gen-supportreport`: regular files only, owner
//! root, mode 0600, into memory under a fixed cap. A crate would bring more than these lines.
//!
//! Layout: per file a 512-byte header and the content padded to 512 bytes; two zero blocks end
//! the archive.

const BLOCK: usize = 512;
/// Longest name the header's name field holds (no prefix field splitting: our names are short).
pub const MAX_NAME_BYTES: usize = 100;
/// ustar's size field: 11 octal digits.
const MAX_FILE_BYTES: u64 = 0o77_777_777_777;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TarError {
    #[error("tar member {name:?}: the name is longer than {MAX_NAME_BYTES} bytes or not plain ASCII")]
    Name { name: String },
    #[error("tar member {name:?}: {bytes} bytes would pass the archive's cap of {cap} bytes")]
    Full { name: String, bytes: usize, cap: usize },
}

/// An archive being written into memory, never longer than its cap (end blocks included).
pub struct TarWriter {
    out: Vec<u8>,
    cap: usize,
    mtime: u64,
}

impl TarWriter {
    pub fn new(cap: usize, mtime: u64) -> Self {
        Self { out: Vec::new(), cap, mtime }
    }

    /// Bytes a member of `len` content bytes takes, header and padding included.
    pub fn member_bytes(len: usize) -> usize {
        BLOCK + len.div_ceil(BLOCK) * BLOCK
    }

    /// Content bytes that still fit in one more member (the end blocks kept in reserve).
    pub fn room(&self) -> usize {
        let left = self.cap.saturating_sub(self.out.len() + 2 * BLOCK + BLOCK);
        left - left % BLOCK
    }

    pub fn add(&mut self, name: &str, content: &[u8]) -> Result<(), TarError> {
        if name.is_empty() || name.len() > MAX_NAME_BYTES || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TarError::Name { name: name.to_string() });
        }
        let bytes = Self::member_bytes(content.len());
        if content.len() as u64 > MAX_FILE_BYTES || self.out.len() + bytes + 2 * BLOCK > self.cap {
            return Err(TarError::Full { name: name.to_string(), bytes, cap: self.cap });
        }
        let mut header = [0u8; BLOCK];
        header[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut header[100..108], 0o600);
        octal(&mut header[108..116], 0);
        octal(&mut header[116..124], 0);
        octal(&mut header[124..136], content.len() as u64);
        octal(&mut header[136..148], self.mtime);
        header[156] = b'0';
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        header[265..269].copy_from_slice(b"root");
        header[297..301].copy_from_slice(b"root");
        // The checksum is computed with its own field as spaces.
        header[148..156].copy_from_slice(b"        ");
        let sum: u64 = header.iter().map(|&b| u64::from(b)).sum();
        octal(&mut header[148..155], sum);
        header[155] = b' ';
        self.out.extend_from_slice(&header);
        self.out.extend_from_slice(content);
        self.out.resize(self.out.len() + (BLOCK - content.len() % BLOCK) % BLOCK, 0);
        Ok(())
    }

    /// The archive with its two end blocks.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.resize(self.out.len() + 2 * BLOCK, 0);
        self.out
    }
}

/// `value` as zero-padded octal digits filling `field` but its last byte, which is NUL.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    let text = &text.as_bytes()[text.len().saturating_sub(digits)..];
    field[..digits].copy_from_slice(text);
    field[digits] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_carry_name_size_mode_and_a_valid_checksum() {
        let mut tar = TarWriter::new(64 * 1024, 1_700_000_000);
        tar.add("report/a.txt", b"hello").unwrap();
        let bytes = tar.finish();
        assert_eq!(bytes.len(), 512 + 512 + 1024);
        assert_eq!(&bytes[..12], b"report/a.txt");
        assert_eq!(&bytes[100..108], b"0000600\0");
        assert_eq!(&bytes[124..136], b"00000000005\0");
        assert_eq!(&bytes[257..263], b"ustar\0");
        let stored = u64::from_str_radix(std::str::from_utf8(&bytes[148..154]).unwrap(), 8).unwrap();
        let mut header = bytes[..512].to_vec();
        header[148..156].copy_from_slice(b"        ");
        assert_eq!(stored, header.iter().map(|&b| u64::from(b)).sum::<u64>());
        assert_eq!(&bytes[512..517], b"hello");
        assert!(bytes[517..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_cap_and_the_name_limit_hold() {
        let mut tar = TarWriter::new(4 * 512, 0);
        assert_eq!(tar.room(), 512, "one member of one block and the end blocks fill 4 blocks");
        assert!(tar.add("a", b"x").is_ok());
        assert_eq!(tar.room(), 0);
        assert!(matches!(tar.add("b", b"x"), Err(TarError::Full { .. })));
        assert_eq!(tar.finish().len(), 4 * 512);
        let mut tar = TarWriter::new(1 << 20, 0);
        assert!(matches!(tar.add(&"n".repeat(101), b""), Err(TarError::Name { .. })));
        assert!(matches!(tar.add("with space", b""), Err(TarError::Name { .. })));
        assert!(tar.room() > 0 && tar.room() % 512 == 0);
    }
}
