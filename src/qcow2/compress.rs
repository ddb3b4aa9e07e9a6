//! Decompression of compressed clusters: raw deflate (zlib type) or zstd. The stored bytes may run
//! past the end of the compressed stream (they are rounded to sectors); the output must fill exactly
//! one cluster, as QEMU requires.

use super::header::Compression;

/// Decompress `input` into `out`, which must be filled completely.
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<(), ()> {
    match kind {
        Compression::Zlib => inflate(input, out),
        Compression::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), ()> {
    let mut d = flate2::Decompress::new(false);
    loop {
        let before_in = d.total_in();
        let before_out = d.total_out();
        let in_at = before_in as usize;
        let out_at = before_out as usize;
        let status = d
            .decompress(
                &input[in_at..],
                &mut out[out_at..],
                flate2::FlushDecompress::Finish,
            )
            .map_err(|_| ())?;
        if d.total_out() as usize == out.len() {
            return Ok(());
        }
        let stuck = d.total_in() == before_in && d.total_out() == before_out;
        if status == flate2::Status::StreamEnd || stuck {
            return Err(());
        }
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), ()> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut dec = Decoder::new().map_err(|_| ())?;
    let mut src = InBuffer::around(input);
    let mut dst = OutBuffer::around(out);
    // Frames follow each other until the cluster is full; trailing padding is ignored.
    while dst.pos() < dst.capacity() {
        let before = (src.pos, dst.pos());
        dec.run(&mut src, &mut dst).map_err(|_| ())?;
        if (src.pos, dst.pos()) == before {
            return Err(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sample() -> Vec<u8> {
        (0..65536u32).map(|i| (i / 100) as u8).collect()
    }

    #[test]
    fn inflates_raw_deflate_with_trailing_padding() {
        let data = sample();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut packed = enc.finish().unwrap();
        packed.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0u8; data.len()];
        decompress(Compression::Zlib, &packed, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn decodes_zstd_with_trailing_padding() {
        let data = sample();
        let mut packed = zstd::bulk::compress(&data, 3).unwrap();
        packed.extend_from_slice(&[0; 100]);
        let mut out = vec![0u8; data.len()];
        decompress(Compression::Zstd, &packed, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn rejects_streams_that_do_not_fill_the_cluster() {
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&[1u8; 100]).unwrap();
        let packed = enc.finish().unwrap();
        let mut out = vec![0u8; 4096];
        assert!(decompress(Compression::Zlib, &packed, &mut out).is_err());
        assert!(decompress(Compression::Zstd, &[0x28, 0xb5, 0x2f, 0xfd, 0, 0], &mut out).is_err());
        assert!(decompress(Compression::Zlib, &[0xff; 64], &mut out).is_err());
    }
}
