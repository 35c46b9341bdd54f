"""From a checked folder to content others pull: packaging into the store (``package``), push
and pull (``distribute``) and the build cache (``cache``)."""
