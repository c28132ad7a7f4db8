from src.data.device_data import DeviceDataset, FederatedData

__all__ = ["DeviceDataset", "FederatedData"]
