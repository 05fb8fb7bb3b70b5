from kvcache.block_pool import BlockPool
from kvcache.config import CacheConfig
from kvcache.kv_manager import KVCacheManager

__all__ = ["BlockPool", "CacheConfig", "KVCacheManager"]
