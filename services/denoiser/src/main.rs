fn main() {
    kd_runtime::launch::main(
        "kd-denoiser",
        |c: &kd_denoiser::Config| &c.common,
        kd_denoiser::run_with_listeners,
    )
}
