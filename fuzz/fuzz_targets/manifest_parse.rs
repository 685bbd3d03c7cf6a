//! Fuzz manifest parsing: `Manifest::parse` (both format versions' field lists), then `Manifest::validate` and
//! the tensor list it implies. Inputs that look like a bundle (the test kit's `.ferry` files) are parsed from
//! their manifest bytes under their header's version, so the kit seeds this target too; anything else is parsed
//! as JSON directly, under both versions. A panic is a finding.
#![no_main]

use ferry_bundle::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (json, versions): (&[u8], &[u16]) = if data.len() >= 32 && &data[8..16] == b"FERRYBDL" {
        let ml = u32::from_le_bytes([data[28], data[29], data[30], data[31]]) as usize;
        let v = if data[16] == 1 { &[1u16][..] } else { &[2u16][..] };
        (data.get(32..32 + ml).unwrap_or(&data[32..]), v)
    } else {
        (data, &[1, 2])
    };
    for m in versions.iter().filter_map(|v| Manifest::parse(*v, json).ok()) {
        if m.validate().is_ok() {
            // A valid manifest's tensor list is complete and re-serialises to a manifest that is valid again.
            assert_eq!(m.tensor_metas().len(), m.tensors.len());
            let again: Manifest = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
            assert_eq!(again, m);
            assert!(again.validate().is_ok());
        }
    }
});
