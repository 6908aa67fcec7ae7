kd_runtime::service_main!("kd-movq", kd_movq);
