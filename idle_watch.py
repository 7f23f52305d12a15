# a Python watch with nothing happening: does the server keep it open past 120 s?
from common import *
import time
co=client.CustomObjectsApi(api)
t0=time.time()
try:
    for ev in watch.Watch().stream(co.list_namespaced_custom_object,"karri.dev","v1alpha1","admin","leases", label_selector="nothing=here", timeout_seconds=190, _request_timeout=195):
        print("event", ev["type"])
    print("stream ended normally after %.0fs" % (time.time()-t0))
except Exception as e:
    print("stream error after %.0fs: %r" % (time.time()-t0, e))
