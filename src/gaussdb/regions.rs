//! The region table: which host serves the GaussDB (for MySQL) API in each region.
//!
//! Three host prefixes are in use; an `api.endpoint` in the configuration replaces the table.

/// `(prefix, regions)` as published; see the API reference in `shared/reference`.
const TABLE: &[(&str, &[&str])] = &[
    (
        "gaussdb",
        &[
            "cn-north-4",
            "cn-north-2",
            "cn-north-9",
            "cn-east-3",
            "cn-south-1",
            "cn-south-4",
            "cn-southwest-2",
            "ap-southeast-3",
            "ap-southeast-4",
            "sa-brazil-1",
            "ru-northwest-2",
        ],
    ),
    (
        "gaussdbformysql",
        &[
            "tr-west-1",
            "ap-southeast-1",
            "ap-southeast-2",
            "cn-north-11",
            "me-east-1",
        ],
    ),
    (
        "gaussdb-mysql",
        &["af-south-1", "cn-east-5", "la-north-2", "cn-southwest-3"],
    ),
];

/// The host prefix for `region`, or `None` for a region the service is not offered in.
pub fn host_prefix(region: &str) -> Option<&'static str> {
    TABLE
        .iter()
        .find(|(_, regions)| regions.contains(&region))
        .map(|(prefix, _)| *prefix)
}

/// The public HTTPS endpoint of `region`.
pub fn endpoint(region: &str) -> Option<String> {
    host_prefix(region).map(|prefix| format!("https://{prefix}.{region}.myhuaweicloud.com"))
}

/// Every known region id.
pub fn all() -> impl Iterator<Item = &'static str> {
    TABLE
        .iter()
        .flat_map(|(_, regions)| regions.iter().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twenty_regions_under_three_prefixes() {
        assert_eq!(all().count(), 20);
        assert_eq!(
            endpoint("cn-north-4").unwrap(),
            "https://gaussdb.cn-north-4.myhuaweicloud.com"
        );
        assert_eq!(
            endpoint("ap-southeast-1").unwrap(),
            "https://gaussdbformysql.ap-southeast-1.myhuaweicloud.com"
        );
        assert_eq!(
            endpoint("cn-southwest-3").unwrap(),
            "https://gaussdb-mysql.cn-southwest-3.myhuaweicloud.com"
        );
        assert_eq!(endpoint("us-east-1"), None);
    }
}
