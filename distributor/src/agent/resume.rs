//! Resuming a partial blob after a restart: the pieces already in `partial/<hex>` are
//! hashed again and those matching the origin's piece manifest are kept; everything else
//! is fetched. Nothing on disk is trusted without that check (a piece may have been half
//! written when the agent was killed, or the file may have been damaged since).

use crate::pieces::{piece_hash, Bitfield, Geometry};
use std::fs::File;

/// The pieces of `file` whose bytes match their known hash (`hashes[i]`).
pub fn verified_pieces(file: &File, geo: &Geometry, hashes: &[Option<String>]) -> Bitfield {
    let mut have = Bitfield::new(geo.count());
    for (i, h) in hashes.iter().enumerate() {
        let Some(h) = h else { continue };
        let (start, end) = geo.range(i);
        match crate::disk::read_at(file, start, end - start) {
            Ok(bytes) if piece_hash(&bytes) == *h => have.set(i),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("agent: reading piece {i} of a partial blob: {e}; fetching it again");
                break;
            }
        }
    }
    have
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pieces::MIN_PIECE;
    use std::io::Write as _;

    #[test]
    fn only_pieces_matching_their_hash_are_kept() {
        let geo = Geometry::for_size(3 * MIN_PIECE + 10);
        let blob: Vec<u8> = (0..geo.size).map(|i| (i % 251) as u8).collect();
        let hashes: Vec<Option<String>> = (0..geo.count())
            .map(|i| {
                let (s, e) = geo.range(i);
                Some(piece_hash(&blob[s as usize..e as usize]))
            })
            .collect();
        let mut f = tempfile::tempfile().expect("temp file");
        let mut on_disk = blob.clone();
        // Piece 1 never arrived (zeros), piece 2 was damaged, piece 3's hash is unknown.
        let (s1, e1) = geo.range(1);
        on_disk[s1 as usize..e1 as usize].fill(0);
        on_disk[geo.range(2).0 as usize] ^= 1;
        f.write_all(&on_disk).expect("write");
        let mut known = hashes.clone();
        known[3] = None;
        let have = verified_pieces(&f, &geo, &known);
        assert_eq!((0..geo.count()).map(|i| have.get(i)).collect::<Vec<_>>(), [true, false, false, false]);
        assert!(verified_pieces(&f, &geo, &hashes).get(3), "the last, short piece");
    }
}
