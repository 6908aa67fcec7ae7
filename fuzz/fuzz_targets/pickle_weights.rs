//! Any bytes as a PyTorch checkpoint (`torch.save` zip, pickle inside) through the safe reader:
//! open (flattened and with a `state_dict` key), then load every tensor it lists. An error naming
//! the file, never a panic, a hang or an allocation the file merely claims.
#![no_main]

use kd_models::checkpoint::PickleWeights;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The reader takes a path: one scratch file per fuzzing process.
    let path = std::env::temp_dir().join(format!("kd-fuzz-pickle-{}.pt", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    for key in [None, Some("state_dict")] {
        if let Ok(w) = PickleWeights::open(&path, key) {
            for name in w.keys() {
                let _ = w.load(name, &candle_core::Device::Cpu);
            }
        }
    }
});
