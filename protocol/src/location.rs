//! Geographic location of nodes and of Proximity mesh centers.

use serde::{Deserialize, Serialize};

/// A point on Earth in decimal degrees (WGS 84).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Location {
    /// Latitude in degrees, from -90 (south pole) to 90 (north pole).
    #[cfg_attr(feature = "schema", schemars(range(min = -90.0, max = 90.0)))]
    pub latitude: f64,
    /// Longitude in degrees, from -180 to 180 (east positive).
    #[cfg_attr(feature = "schema", schemars(range(min = -180.0, max = 180.0)))]
    pub longitude: f64,
}

/// Mean Earth radius used for great-circle distances, in kilometres.
const EARTH_RADIUS_KM: f64 = 6371.0088;

impl Location {
    /// Great-circle (haversine) distance to `other`, in kilometres.
    pub fn distance_km(&self, other: &Location) -> f64 {
        let (lat1, lat2) = (self.latitude.to_radians(), other.latitude.to_radians());
        let dlat = lat2 - lat1;
        let dlon = (other.longitude - self.longitude).to_radians();
        let a = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
        2.0 * EARTH_RADIUS_KM * a.sqrt().min(1.0).asin()
    }

    /// Whether both coordinates are within their valid ranges.
    pub fn is_valid(&self) -> bool {
        (-90.0..=90.0).contains(&self.latitude) && (-180.0..=180.0).contains(&self.longitude)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_between_known_cities() {
        let paris = Location { latitude: 48.8566, longitude: 2.3522 };
        let london = Location { latitude: 51.5074, longitude: -0.1278 };
        let d = paris.distance_km(&london);
        assert!((d - 343.5).abs() < 2.0, "Paris-London is about 344 km, got {d}");
        assert_eq!(paris.distance_km(&paris), 0.0);
    }

    #[test]
    fn distance_across_the_antimeridian() {
        let a = Location { latitude: 0.0, longitude: 179.5 };
        let b = Location { latitude: 0.0, longitude: -179.5 };
        assert!((a.distance_km(&b) - 111.2).abs() < 1.0);
    }
}
