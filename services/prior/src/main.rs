kd_runtime::service_main!("kd-prior", kd_prior);
