fn main() {
    kd_runtime::launch::main(
        "kd-prior",
        |c: &kd_prior::Config| &c.common,
        kd_prior::run_with_listeners,
    )
}
