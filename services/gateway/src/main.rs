kd_runtime::service_main!("kd-gateway", kd_gateway);
