fn main() {
    kd_runtime::launch::main(
        "kd-movq",
        |c: &kd_movq::Config| &c.common,
        kd_movq::run_with_listeners,
    )
}
