fn main() {
    kd_runtime::launch::main(
        "kd-gateway",
        |c: &kd_gateway::Config| &c.common,
        kd_gateway::run_with_listeners,
    )
}
